"""Activation memory of one rank's stage in each kind of pass, counted from ``models/``.

Sizes per rank (B micro-batch samples): S tokens; the context-parallel chunk Sc = ceil(S/CP)
is what a tensor-parallel region sees (its gathered input, q/k/v, the FFN hidden); the token
stream between regions holds Ss = ceil(Sc/TP) tokens under sequence parallelism, else Sc.
Dl = D/TP, Fl = F/TP, L text tokens. e = bytes of an activation (2 in bf16), c = bytes of the
fp32 (fp64 in the oracle) work the norms, modulation and residuals do.

**Saved for backward by one block** (``WanBlock.forward``, read off the autograd graph; each
storage once; tests/test_planning.py measures it with ``saved_tensors_hooks``):

    token stream, per Ss x D:   norm1 (centred input; normalized output, which adaLN's
                                product keeps) 2c, gated residual branch in fp32 c;
                                norm2 2c; norm3 2c; gated residual c                 = 8c
    TP-region inputs, Sc x D:   self-attention, cross-attention and FFN inputs       = 3e
    attention, Sc x Dl:         q/k RMSNorm 2c each (self q, k; cross q); SDPA/flash keeps
                                q, k, v, out (self) and q, out (cross); RoPE saves nothing
                                (its tables need no grad)                           = 6c + 6e
    FFN, Sc x Fl:               GELU input, fc2 input                                = 2e
    text, L x Dl:               cross-attention k norm 2c, k and v                   = 2c + 2e

**Working set of a no-grad block** (teacher, rollouts, fake score: nothing is saved; the peak
is the largest phase of one block, on top of the incoming stream). **Tangent pass**: the same
with a tangent beside every activation, the attention through the fused kernel (its outputs
only), and GELU's tangent, whose fp32 derivative holds several u-sized temporaries at once.
The phase coefficients below are counted from the code paths (see each constant) and
checked against ``planning.measure.LiveTensorPeak`` within 10%.
"""

from __future__ import annotations

from dataclasses import dataclass

from ..models.config import WanConfig


@dataclass(frozen=True)
class RankShape:
    """Per-rank sizes of one pass (module docstring)."""

    batch: int
    tokens: int  # S
    text_len: int  # L
    tp: int = 1
    cp: int = 1
    sequence_parallel: bool = False
    act_bytes: int = 2  # e
    compute_bytes: int = 4  # c
    fused_elementwise: bool = False  # blocks under torch.compile (training/compile_policy.py)

    @property
    def chunk(self) -> int:  # Sc
        return -(-self.tokens // self.cp)

    @property
    def stream(self) -> int:  # Ss
        return -(-self.chunk // self.tp) if self.sequence_parallel and self.tp > 1 else self.chunk


def saved_per_block(cfg: WanConfig, r: RankShape) -> float:
    """Bytes one block saves for backward (module docstring)."""
    e, c, b = r.act_bytes, r.compute_bytes, r.batch
    d, dl, fl = cfg.hidden_size, cfg.hidden_size / r.tp, cfg.ffn_hidden_size / r.tp
    return b * (8 * c * r.stream * d + 3 * e * r.chunk * d + (6 * c + 6 * e) * r.chunk * dl
                + 2 * e * r.chunk * fl + (2 * c + 2 * e) * r.text_len * dl)


def saved_outside_blocks(cfg: WanConfig, r: RankShape, pre_process: bool, post_process: bool) -> float:
    """Embeddings and head with grad: the text embedding's hidden, the head's norm (2c) and
    projection input (e) per stream token; the text context once (e, L x D)."""
    e, c, b, d = r.act_bytes, r.compute_bytes, r.batch, cfg.hidden_size
    out = b * e * r.text_len * d  # embedded context, shared by every block's cross-attention
    if pre_process:
        out += b * (e + c) * r.text_len * d
    if post_process:
        out += b * (2 * c + e) * r.stream * d
    return out


# Bytes per element at each phase's peak, counted from the code and checked by LiveTensorPeak
# (the phase's input excluded):
# self-attention (no grad), per Sc x Dl: q, k, v and the output projection's input (4e), q/k
# RMSNorm's fp32 input, product and scaled copy (3c; RoPE's fp32 halves are smaller).
SELF_ATTENTION_FORWARD = 4 * 2 + 3 * 4
# The same with tangents: q, k, v, the kernel's out and their tangents (8e), the norm's and
# RoPE's fp32 work on a value and its tangent (5c).
SELF_ATTENTION_TANGENT = 8 * 2 + 5 * 4
# FFN (no grad), per Sc x Fl: fc1 output and GELU output (2e).
FFN_FORWARD = 2 * 2
# FFN with tangent, per Sc x Fl: fc1 output and tangent (2e), GELU's output pair (2e) and its
# derivative in fp32: u, the tanh argument, tanh, the partial derivative and up to three
# temporaries of one expression (7c).
FFN_TANGENT = 4 * 2 + 7 * 4
# Gated residual, per Ss x D: the residual and the branch in fp32, their product/sum (4c) and
# the bf16 result (e); with a tangent twice that.
RESIDUAL_FORWARD = 4 * 4 + 2
RESIDUAL_TANGENT = 2 * RESIDUAL_FORWARD
# LayerNorm (norm2 with its affine weight), per Ss x D: fp32 input, centred input, normalized
# output and the affine product (4c); with a tangent twice that.
NORM_FORWARD = 4 * 4
NORM_TANGENT = 2 * NORM_FORWARD
# Compiled blocks (--compile-blocks): inductor fuses each run of elementwise ops into one kernel,
# so a no-grad phase holds only the fused kernels' outputs, in the activation dtype, besides the
# GEMM and attention tensors: self-attention with tangents, per Sc x Dl, q, k, v, out and their
# tangents (8e) plus the normed and rotated q, k and tangents (4e); the FFN with tangent, per
# Sc x Fl, fc1's output pair and GELU's output pair (4e); residual and norm, per Ss x D, the new
# value (and tangent) in fp32 (c, 2c with a tangent). The with-grad passes keep the eager count
# (what autograd saves there is an upper bound of what the compiled graph saves).
FUSED_SELF_ATTENTION_FORWARD = 6 * 2
FUSED_SELF_ATTENTION_TANGENT = 12 * 2
FUSED_FFN_FORWARD = 2 * 2
FUSED_FFN_TANGENT = 4 * 2
FUSED_RESIDUAL_FORWARD = FUSED_NORM_FORWARD = 4
FUSED_RESIDUAL_TANGENT = FUSED_NORM_TANGENT = 2 * 4
# With grad, besides what is saved: the fp32 residual arithmetic of the block being run or
# differentiated (the stream's gradient and its fp32 partials), per Ss x D.
WITH_GRAD_TRANSIENT = 4 * 4


def block_working_set(cfg: WanConfig, r: RankShape, tangent: bool) -> float:
    """Peak bytes one no-grad block holds besides its input stream (x, and x_tan with a tangent):
    the new residual stream, the normalized input cast to the activation dtype and the copy the
    tensor-parallel region reads (gathered under SP, value and tangent packed into one buffer),
    and the largest of the attention, FFN, residual and norm phases."""
    k = 2 if tangent else 1  # value (and tangent)
    b, e = r.batch, r.act_bytes
    d, dl, fl = cfg.hidden_size, cfg.hidden_size / r.tp, cfg.ffn_hidden_size / r.tp
    gathered = r.sequence_parallel and r.tp > 1
    region_input = k * e * d * (r.stream + (r.chunk if gathered or tangent else 0))
    stream = k * e * r.stream * d  # the block's new residual stream
    if r.fused_elementwise:
        attention = (FUSED_SELF_ATTENTION_TANGENT if tangent else FUSED_SELF_ATTENTION_FORWARD) * r.chunk * dl
        ffn = (FUSED_FFN_TANGENT if tangent else FUSED_FFN_FORWARD) * r.chunk * fl
        residual = (FUSED_RESIDUAL_TANGENT if tangent else FUSED_RESIDUAL_FORWARD) * r.stream * d
        norm = (FUSED_NORM_TANGENT if tangent else FUSED_NORM_FORWARD) * r.stream * d
    else:
        attention = (SELF_ATTENTION_TANGENT if tangent else SELF_ATTENTION_FORWARD) * r.chunk * dl
        ffn = (FFN_TANGENT if tangent else FFN_FORWARD) * r.chunk * fl
        residual = (RESIDUAL_TANGENT if tangent else RESIDUAL_FORWARD) * r.stream * d
        norm = (NORM_TANGENT if tangent else NORM_FORWARD) * r.stream * d
    return b * (stream + max(region_input + attention, region_input + ffn, residual, norm))


def rope_table_bytes(cfg: WanConfig, r: RankShape) -> float:
    """cos and sin [Sc, head_dim / 2] in fp32 (fp64 in the oracle)."""
    return r.chunk * cfg.head_dim * r.compute_bytes


@dataclass(frozen=True)
class PassMemory:
    """Activation bytes of one pass of one rank's stage."""

    resident: float  # held until backward (with grad) or the pass's streams (no grad)
    transient: float  # on top of it at the peak

    @property
    def peak(self) -> float:
        return self.resident + self.transient


def no_grad_pass(cfg: WanConfig, r: RankShape, tangent: bool, post_process: bool = True) -> PassMemory:
    """Teacher / rollout / fake-score forward (tangent=False) or the sCM tangent pass."""
    k = 2 if tangent else 1
    streams = (k * r.batch * r.act_bytes * r.stream * cfg.hidden_size + r.batch * r.act_bytes * r.text_len
               * cfg.hidden_size + rope_table_bytes(cfg, r))
    work = block_working_set(cfg, r, tangent)
    if post_process:  # the head's fp32 norm/modulation of the stream
        work = max(work, k * r.batch * 3 * r.compute_bytes * r.stream * cfg.hidden_size)
    return PassMemory(streams, work)


def with_grad_pass(cfg: WanConfig, r: RankShape, num_layers: int, recompute_num_layers: int = 0,
                   pre_process: bool = True, post_process: bool = True) -> PassMemory:
    """Forward + backward of the trained model over ``num_layers`` local blocks. With
    ``recompute_num_layers`` N > 0 only each group's input stream is kept and one group is
    re-run (and saved) at a time in backward."""
    per_block = saved_per_block(cfg, r)
    before = saved_outside_blocks(cfg, r, pre_process, False) + rope_table_bytes(cfg, r)
    head = saved_outside_blocks(cfg, r, False, post_process) - saved_outside_blocks(cfg, r, False, False)
    transient = WITH_GRAD_TRANSIENT * r.batch * r.stream * cfg.hidden_size
    if recompute_num_layers <= 0:
        return PassMemory(num_layers * per_block + before + head, transient)
    # The head's saved tensors are freed (its backward is done) before the first group is re-run.
    groups = -(-num_layers // recompute_num_layers)
    inputs = groups * r.batch * r.act_bytes * r.stream * cfg.hidden_size
    return PassMemory(inputs + before, max(head, min(recompute_num_layers, num_layers) * per_block) + transient)
