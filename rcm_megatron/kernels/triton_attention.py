"""Fused attention with a forward-mode tangent (FlashAttention-2 style Triton kernel).

Why our own kernel: rCM's sCM loss needs the Jacobian-vector product of the student through
every attention layer at 32K-75K tokens. cuDNN, FlashAttention and PyTorch SDPA offer forward
and backward only; no fused library computes forward-mode tangents, and ``torch.func.jvp`` over
plain-math attention materialises the [L, L] score matrix (and its tangent), which does not fit
at these lengths. This kernel streams over key/value tiles once and produces the primal and the
tangent together (docs/design.md §4.2):

    S = s Q K^T, P = softmax(S), O = P V
    tS = s (tQ K^T + Q tK^T), tlse = rowsum(P * tS), tO = (P * tS) V + P tV - tlse O

Per KV tile, with P~ = exp(S - m) and H~ = P~ * tS rescaled by alpha = exp(m_old - m_new):
    l += rowsum P~, r += rowsum H~, O~ += P~ V, A~ += P~ tV + H~ V
and at the end O = O~/l, tO = A~/l - (r/l) O, lse = m + log l, tlse = r/l.

Six matmul units per tile (S, tQ K^T, Q tK^T, P V, P tV, H V) = 3x a forward; with zero key/value
tangents (cross-attention to text) only four (S, tQ K^T, P V, H V) = 2x.

Implementation notes
- One program owns BLOCK_M query rows of one (batch, head); Q and tQ stay on chip, K/V (and
  tK/tV) tiles stream through a software pipeline (``num_stages``). Programs of one head are
  adjacent in the grid so its K/V stay in L2.
- The softmax runs in base 2 with log2(e) folded into the score scale (one FMA + exp2 per
  score); everything accumulates in fp32, P~ and H~ are rounded to the input dtype for the
  P~ V, P~ tV and H~ V products. The exponent is biased by log2(softmax scale) so that
  H~ = P~ * tS is one multiply per score (tv is divided by the scale in one elementwise pass).
- Triton 3.6 waits for each score product right after issuing it and serialises the two
  warpgroups with CTA barriers around every TMA issue, so MMA and softmax overlap only where
  ptxas hoists independent softmax work above a wait (and the last P~ tV product stays in
  flight into the next tile). docs/performance.md has the measurements and what would go further.
- Sequence lengths are runtime ints that Triton does not specialise on (``do_not_specialize``),
  and launch configs are cached per (GPU, head dim, dtype, KV-tangent) in ``tuning.py``: a new
  sequence length never recompiles or retunes.
- Ragged lengths: full KV tiles run unmasked; one masked tail tile handles the rest. Query rows
  past ``seq_q`` are computed on zeros and not stored.
- ``kv_len`` (int, or int tensor [batch]) excludes padded keys past that length; a row with no
  valid key (``seq_k == 0`` or ``kv_len == 0``) returns out = tout = 0, lse = -inf, tlse = 0,
  which ``merge.merge_attention_chunks`` treats as weight 0 (ring attention with padded tails).
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from . import tuning

LOG2E = 1.4426950408889634
SUPPORTED_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
MAX_HEAD_DIM = 128


def _block_d(head_dim: int) -> int:
    return max(16, triton.next_power_of_2(head_dim))


@triton.jit
def _load_kv(src, row0, col0, start_n, stride_s, offs_n, dmask, kv_end,
             MASK: tl.constexpr, EVEN_D: tl.constexpr, USE_TMA: tl.constexpr):
    """A [BLOCK_N, BLOCK_D] key/value tile; rows >= kv_end read as 0 when MASK.

    Pointer mode: ``src`` holds the tile's pointers for start_n = 0. TMA mode: ``src`` is a 2D
    tensor descriptor over [batch * seq_k, heads * head_dim] and (row0, col0) the tile origin.
    """
    if USE_TMA:
        x = src.load([row0 + start_n, col0])
        if MASK:  # rows past kv_end may be another batch's keys or padding garbage
            x = tl.where(((start_n + offs_n) < kv_end)[:, None], x, 0.0)
    elif MASK:
        ld_mask = ((start_n + offs_n) < kv_end)[:, None] & dmask[None, :]
        x = tl.load(src + start_n * stride_s, mask=ld_mask, other=0.0)
    elif EVEN_D:
        x = tl.load(src + start_n * stride_s)
    else:
        x = tl.load(src + start_n * stride_s, mask=dmask[None, :], other=0.0)
    return x


@triton.jit
def _tile(
    acc_o, acc_t, m_i, l_i, r_i,
    q, tq,
    k_src, v_src, tk_src, tv_src,
    row0, col0,
    start_n, kv_end, offs_n, dmask,
    stride_ks, stride_vs, stride_tks, stride_tvs,
    log2c, qk_scale,
    HAS_KV_TANGENT: tl.constexpr,
    MASK: tl.constexpr,
    EVEN_D: tl.constexpr,
    USE_TMA: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
):
    """One KV tile of the streaming update (see module docstring)."""
    k = _load_kv(k_src, row0, col0, start_n, stride_ks, offs_n, dmask, kv_end, MASK, EVEN_D, USE_TMA)
    kt = tl.trans(k)
    s = tl.dot(q, kt, input_precision=DOT_PRECISION)
    ts = tl.dot(tq, kt, input_precision=DOT_PRECISION)
    if HAS_KV_TANGENT:
        tk = _load_kv(tk_src, row0, col0, start_n, stride_tks, offs_n, dmask, kv_end, MASK, EVEN_D, USE_TMA)
        ts = tl.dot(q, tl.trans(tk), ts, input_precision=DOT_PRECISION)
    if MASK:
        s = tl.where(((start_n + offs_n) < kv_end)[None, :], s, float("-inf"))
    # Base-2 online softmax; qk_scale = softmax_scale * log2(e) > 0. The exponent is biased by
    # log2(softmax_scale) = log2c, so p = softmax_scale * P~ and h = p * ts is exactly
    # H~ = P~ * tS for the raw ts = tq K^T + q tK^T: one multiply per score. O~ and l carry the
    # factor softmax_scale (cancels in O = O~ / l); the P~ tV product gets it removed by
    # passing tV / softmax_scale (the wrapper's one elementwise pass).
    m_new = tl.maximum(m_i, tl.max(s, 1) * qk_scale)
    p = tl.math.exp2(s * qk_scale - (m_new - log2c)[:, None])
    alpha = tl.math.exp2(m_i - m_new)
    h = p * ts
    l_i = l_i * alpha + tl.sum(p, 1)
    r_i = r_i * alpha + tl.sum(h, 1)
    acc_o = acc_o * alpha[:, None]
    acc_t = acc_t * alpha[:, None]
    v = _load_kv(v_src, row0, col0, start_n, stride_vs, offs_n, dmask, kv_end, MASK, EVEN_D, USE_TMA)
    pc = p.to(v.dtype)
    acc_o = tl.dot(pc, v, acc_o, input_precision=DOT_PRECISION)
    acc_t = tl.dot(h.to(v.dtype), v, acc_t, input_precision=DOT_PRECISION)
    if HAS_KV_TANGENT:
        tv = _load_kv(tv_src, row0, col0, start_n, stride_tvs, offs_n, dmask, kv_end, MASK, EVEN_D, USE_TMA)
        acc_t = tl.dot(pc, tv, acc_t, input_precision=DOT_PRECISION)
    return acc_o, acc_t, m_new, l_i, r_i


@triton.jit(do_not_specialize=["seq_q", "seq_k", "kv_rows"])
def _attn_tangent_fwd(
    Q, K, V, TQ, TK, TV, O, TO, LSE, TLSE, KV_LEN,
    sm_scale, log2c, qk_scale,
    seq_q, seq_k, kv_rows, H,
    s_qb, s_qs, s_qh,
    s_kb, s_ks, s_kh,
    s_vb, s_vs, s_vh,
    s_tqb, s_tqs, s_tqh,
    s_tkb, s_tks, s_tkh,
    s_tvb, s_tvs, s_tvh,
    s_ob, s_os, s_oh,
    s_tob, s_tos, s_toh,
    HEAD_DIM: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    HAS_KV_TANGENT: tl.constexpr,
    HAS_KV_LEN: tl.constexpr,
    USE_TMA: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
):
    """seq_k: keys to use (<= kv_rows); kv_rows: rows per batch of the K/V tensors.
    TV must arrive divided by softmax_scale (see _tile); log2c = log2(softmax_scale)."""
    pid_m = tl.program_id(0)
    pid_bh = tl.program_id(1)
    off_b = (pid_bh // H).to(tl.int64)
    off_h = (pid_bh % H).to(tl.int64)
    EVEN_D: tl.constexpr = HEAD_DIM == BLOCK_D

    kv_end = seq_k
    if HAS_KV_LEN:
        kv_end = tl.minimum(kv_end, tl.load(KV_LEN + off_b).to(tl.int32))
        kv_end = tl.maximum(kv_end, 0)

    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    dmask = offs_d < HEAD_DIM
    mmask = offs_m < seq_q
    q_mask = mmask[:, None] & dmask[None, :]

    q_ptrs = Q + off_b * s_qb + off_h * s_qh + offs_m[:, None] * s_qs + offs_d[None, :]
    tq_ptrs = TQ + off_b * s_tqb + off_h * s_tqh + offs_m[:, None] * s_tqs + offs_d[None, :]
    q = tl.load(q_ptrs, mask=q_mask, other=0.0)
    tq = tl.load(tq_ptrs, mask=q_mask, other=0.0)

    if USE_TMA:
        k_src = K
        v_src = V
        tk_src = TK
        tv_src = TV
    else:
        k_src = K + off_b * s_kb + off_h * s_kh + offs_n[:, None] * s_ks + offs_d[None, :]
        v_src = V + off_b * s_vb + off_h * s_vh + offs_n[:, None] * s_vs + offs_d[None, :]
        if HAS_KV_TANGENT:
            tk_src = TK + off_b * s_tkb + off_h * s_tkh + offs_n[:, None] * s_tks + offs_d[None, :]
            tv_src = TV + off_b * s_tvb + off_h * s_tvh + offs_n[:, None] * s_tvs + offs_d[None, :]
        else:
            tk_src = k_src
            tv_src = v_src
    row0 = (pid_bh // H) * kv_rows
    col0 = (pid_bh % H) * HEAD_DIM

    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    r_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc_o = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    acc_t = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)

    n_full = (kv_end // BLOCK_N) * BLOCK_N
    for start_n in range(0, n_full, BLOCK_N):
        acc_o, acc_t, m_i, l_i, r_i = _tile(
            acc_o, acc_t, m_i, l_i, r_i, q, tq,
            k_src, v_src, tk_src, tv_src, row0, col0,
            start_n, kv_end, offs_n, dmask,
            s_ks, s_vs, s_tks, s_tvs, log2c, qk_scale,
            HAS_KV_TANGENT, False, EVEN_D, USE_TMA, DOT_PRECISION,
        )
    if n_full < kv_end:
        acc_o, acc_t, m_i, l_i, r_i = _tile(
            acc_o, acc_t, m_i, l_i, r_i, q, tq,
            k_src, v_src, tk_src, tv_src, row0, col0,
            n_full, kv_end, offs_n, dmask,
            s_ks, s_vs, s_tks, s_tvs, log2c, qk_scale,
            HAS_KV_TANGENT, True, EVEN_D, USE_TMA, DOT_PRECISION,
        )

    # Epilogue. l_i and acc_o carry softmax_scale (see _tile), r_i and acc_t do not.
    # l == 0 only for a row with no valid key: out = tout = 0, lse = -inf, tlse = 0.
    empty = l_i == 0.0
    l_safe = tl.where(empty, 1.0, l_i)
    inv_l = 1.0 / l_safe
    tlse = r_i * (sm_scale * inv_l)
    out = acc_o * inv_l[:, None]
    tout = acc_t * (sm_scale * inv_l)[:, None] - tlse[:, None] * out
    lse = tl.where(empty, float("-inf"), (m_i - log2c + tl.log2(l_safe)) * 0.6931471805599453)

    o_ptrs = O + off_b * s_ob + off_h * s_oh + offs_m[:, None] * s_os + offs_d[None, :]
    to_ptrs = TO + off_b * s_tob + off_h * s_toh + offs_m[:, None] * s_tos + offs_d[None, :]
    tl.store(o_ptrs, out.to(O.dtype.element_ty), mask=q_mask)
    tl.store(to_ptrs, tout.to(TO.dtype.element_ty), mask=q_mask)
    stat_off = pid_bh.to(tl.int64) * seq_q + offs_m
    tl.store(LSE + stat_off, lse, mask=mmask)
    tl.store(TLSE + stat_off, tlse, mask=mmask)


def triton_attention_supported(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> bool:
    """Whether the fused kernel handles these inputs (else the dispatcher uses the reference)."""
    return (
        q.dtype in SUPPORTED_DTYPES
        and q.dtype == k.dtype == v.dtype
        and q.dim() == 4
        and q.shape[-1] == k.shape[-1] == v.shape[-1]
        and q.shape[-1] <= MAX_HEAD_DIM
        and q.shape[0] == k.shape[0] == v.shape[0]
        and q.shape[2] == k.shape[2] == v.shape[2]
        and k.shape[1] == v.shape[1]
    )


def _last_contig(x: torch.Tensor) -> torch.Tensor:
    return x if x.stride(-1) == 1 else x.contiguous()


def triton_attention_with_tangent(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    tq: torch.Tensor,
    tk: torch.Tensor | None = None,
    tv: torch.Tensor | None = None,
    softmax_scale: float | None = None,
    *,
    kv_len: int | torch.Tensor | None = None,
    config: "tuning.AttnConfig | dict | None" = None,
    out: tuple | None = None,
):
    """(out, tout, lse, tlse) of softmax(s q k^T) v and its tangent along (tq, tk, tv).

    q, tq: [B, Sq, H, D]; k, v, tk, tv: [B, Sk, H, D]; out, tout: [B, Sq, H, D] in q's dtype;
    lse, tlse: fp32 [B, H, Sq]. ``tk = tv = None`` means zero key/value tangents (4-matmul path);
    if only one of them is None it is taken as zeros. ``kv_len`` (int or int tensor [B]) masks
    keys at positions >= kv_len. ``config`` overrides the cached launch config (tests, tuning).
    ``out`` = (out, tout, lse, tlse) preallocated buffers to write into (out/tout any strides
    with unit last stride, in q's dtype; lse/tlse contiguous fp32 [B, H, Sq]).
    """
    if not triton_attention_supported(q, k, v):
        raise ValueError(
            f"unsupported attention inputs q{tuple(q.shape)} {q.dtype} k{tuple(k.shape)} v{tuple(v.shape)}"
        )
    if tq.shape != q.shape:
        raise ValueError(f"tq shape {tuple(tq.shape)} != q shape {tuple(q.shape)}")
    has_kvt = tk is not None or tv is not None
    if has_kvt:
        tk = torch.zeros_like(k) if tk is None else tk
        tv = torch.zeros_like(v) if tv is None else tv
        if tk.shape != k.shape or tv.shape != v.shape:
            raise ValueError("tk/tv must have the shapes of k/v")
    B, Sq, H, D = q.shape
    Sk = k.shape[1]
    scale = float(softmax_scale) if softmax_scale is not None else 1.0 / math.sqrt(D)
    if not scale > 0:
        raise ValueError(f"softmax_scale must be positive, got {scale}")
    dtype = q.dtype
    q, k, v, tq = (_last_contig(x) for x in (q, k, v, tq.to(dtype)))
    if has_kvt:
        tk, tv = _last_contig(tk.to(dtype)), _last_contig(tv.to(dtype))

    if out is None:
        out = torch.empty_like(q, memory_format=torch.contiguous_format)
        tout = torch.empty_like(out)
        lse = torch.empty((B, H, Sq), device=q.device, dtype=torch.float32)
        tlse = torch.empty_like(lse)
    else:
        out, tout, lse, tlse = out
        for x, want in ((out, q), (tout, q)):
            if x.shape != want.shape or x.dtype != dtype or x.stride(-1) != 1:
                raise ValueError("out/tout buffers must match q's shape and dtype, unit last stride")
        for x in (lse, tlse):
            if x.shape != (B, H, Sq) or x.dtype != torch.float32 or not x.is_contiguous():
                raise ValueError("lse/tlse buffers must be contiguous fp32 [B, H, Sq]")
    if out.numel() == 0:
        return out, tout, lse, tlse

    kv_len_t = None
    seq_k = Sk
    if kv_len is not None:
        if isinstance(kv_len, torch.Tensor):
            kv_len_t = kv_len.to(device=q.device, dtype=torch.int32).reshape(-1)
            if kv_len_t.numel() == 1 and B != 1:
                kv_len_t = kv_len_t.expand(B).contiguous()
            if kv_len_t.numel() != B:
                raise ValueError(f"kv_len tensor must have {B} entries")
        else:
            seq_k = max(0, min(Sk, int(kv_len)))

    block_d = _block_d(D)
    if config is None:
        cfg = tuning.get_config(q.device, block_d, dtype, has_kvt)
    elif isinstance(config, dict):
        cfg = tuning.AttnConfig(**config)
    else:
        cfg = config
    # The kernel takes tv divided by softmax_scale (see _tile): then H~ needs one multiply per
    # score. One elementwise pass over tv, ~0.2% of the kernel's time at 32K tokens.
    tk_, tv_ = (tk, tv * (1.0 / scale)) if has_kvt else (k, v)  # k, v stand in for unused tangents
    kv_args = [k, v, tk_, tv_]
    use_tma = bool(cfg.tma) and _tma_ok(kv_args, D, block_d, Sk)
    if use_tma:
        kv_args = [_kv_descriptor(x, B, Sk, H, D, cfg.BLOCK_N) for x in kv_args]
    grid = (triton.cdiv(Sq, cfg.BLOCK_M), B * H)
    global _last_kernel
    _last_kernel = _attn_tangent_fwd[grid](
        q, kv_args[0], kv_args[1], tq, kv_args[2], kv_args[3], out, tout, lse, tlse,
        kv_len_t if kv_len_t is not None else lse,
        scale, math.log2(scale), scale * LOG2E,
        Sq, seq_k, Sk, H,
        q.stride(0), q.stride(1), q.stride(2),
        k.stride(0), k.stride(1), k.stride(2),
        v.stride(0), v.stride(1), v.stride(2),
        tq.stride(0), tq.stride(1), tq.stride(2),
        tk_.stride(0), tk_.stride(1), tk_.stride(2),
        tv_.stride(0), tv_.stride(1), tv_.stride(2),
        out.stride(0), out.stride(1), out.stride(2),
        tout.stride(0), tout.stride(1), tout.stride(2),
        HEAD_DIM=D,
        BLOCK_D=block_d,
        BLOCK_M=cfg.BLOCK_M,
        BLOCK_N=cfg.BLOCK_N,
        HAS_KV_TANGENT=has_kvt,
        HAS_KV_LEN=kv_len_t is not None,
        USE_TMA=use_tma,
        DOT_PRECISION="ieee" if dtype == torch.float32 else None,
        num_warps=cfg.num_warps,
        num_stages=cfg.num_stages,
    )
    return out, tout, lse, tlse


_last_kernel = None  # the last launched CompiledKernel (resource reports in the benchmark)



def _tma_ok(kv, D, block_d, Sk) -> bool:
    """TMA path: 2D view [B*Sk, H*D] of each K/V tensor (rows contiguous across batches,
    heads contiguous in a row, 16-byte aligned), exact head dim, Sk > 0."""
    if D != block_d or Sk == 0:
        return False
    try:
        from triton.tools.tensor_descriptor import TensorDescriptor  # noqa: F401
    except ImportError:
        return False
    for x in kv:
        B, S, H, _ = x.shape
        if x.stride(2) != D or (B > 1 and x.stride(0) != S * x.stride(1)):
            return False
        if (x.stride(1) * x.element_size()) % 16 or x.data_ptr() % 16:
            return False
    return True


def _kv_descriptor(x, B, Sk, H, D, block_n):
    from triton.tools.tensor_descriptor import TensorDescriptor

    return TensorDescriptor(x, [B * Sk, H * D], [x.stride(1), 1], [block_n, D])
