"""Pipeline parallelism: stage layout, packed stage-to-stage transfers, and the two schedules
of the rCM pass plan (docs/design.md §2.5 and §5.4).

Stages hold equal numbers of blocks (``stage_layer_range``). Everything that crosses a stage
boundary travels as ONE message (``stage_message``): the list of tensors (tokens, their tangent,
the embedded text) packed byte-wise into one buffer, preceded by a small int64 header that says
how to unpack it (dtypes and shapes; a missing tangent is an empty slot). Gradients go back in the
same layout without a header: the sender of the activations knows their shapes.

Under TP (SP) and CP a rank's neighbours are the ranks of equal TP, CP and DP rank in the
adjacent stages (megatron-core's pipeline group, order tp-cp-dp-pp; peers are global ranks),
and the tokens it sends are its own shard: under CP the zero-padded chunk of ceil(S/cp)
tokens. No length travels: every stage has the latents, so the receiver recomputes the real
token count (``StageState.seq_len``) from their grid.

Two schedules, both written only against ``torch.distributed`` send/recv (so they run on
gloo and NCCL alike; megatron-core's schedules and p2p code call CUDA):

- ``forward_sweep``: forward-only, over K items (micro-batch chunks of one network call).
  Stage s computes item k as soon as it arrives from stage s-1 and sends it on without
  waiting, so the stages overlap like a GPipe forward: K + p - 1 slots for K items.
- ``one_f_one_b``: the non-interleaved 1F1B schedule (warm-up forwards, steady one-forward-
  one-backward, cool-down backwards) for with-grad passes; the last stage computes each
  item's loss and starts its backward at once, so at most p - s items are in flight on
  stage s. Sends to and receives from the same neighbour in one step go in one
  ``batch_isend_irecv`` so NCCL cannot deadlock on them.

What the items compute is the caller's business (``training/pipeline_step.py``): a step
function gets the received tensors (None on the first stage) and returns the tensors to
send on (or, on the last stage, its result / loss). At PP = 1 both schedules run the step
function locally, item after item, with no communication.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass
from typing import Callable, Sequence

import torch
import torch.distributed as dist

from .stage_message import (HEADER_LEN, Spec, decode_header, encode_header, pack_tensors, packed_nbytes, specs_of,
                            unpack_tensors)

# ------------------------------------------------------------------ layout


def stage_layer_range(num_layers: int, pp_size: int, pp_rank: int) -> tuple[int, int]:
    """[first, last) global block indices of stage ``pp_rank``: equal, contiguous ranges."""
    if pp_size < 1 or not 0 <= pp_rank < pp_size:
        raise ValueError(f"pipeline rank {pp_rank} outside a pipeline of {pp_size} stages")
    if num_layers % pp_size:
        raise ValueError(f"--pipeline-model-parallel-size {pp_size} must divide the number of transformer blocks "
                         f"({num_layers}): stages hold equal numbers of blocks")
    per = num_layers // pp_size
    return pp_rank * per, (pp_rank + 1) * per


@dataclass(frozen=True)
class PipelineLayout:
    """This rank's place in its pipeline. Ranks are global (torch.distributed) ranks."""

    size: int = 1
    rank: int = 0
    group: object = None
    next_rank: int | None = None
    prev_rank: int | None = None
    last_rank: int | None = None  # global rank of this pipeline's last stage

    @property
    def is_first(self) -> bool:
        return self.rank == 0

    @property
    def is_last(self) -> bool:
        return self.rank == self.size - 1

    @classmethod
    def current(cls) -> "PipelineLayout":
        """From megatron-core's parallel_state (a single stage when it is not initialized)."""
        if not (dist.is_available() and dist.is_initialized()):
            return cls()
        from megatron.core import parallel_state as mpu

        if not mpu.model_parallel_is_initialized() or mpu.get_pipeline_model_parallel_world_size() == 1:
            return cls()
        group = mpu.get_pipeline_model_parallel_group()
        ranks = dist.get_process_group_ranks(group)
        rank = mpu.get_pipeline_model_parallel_rank()
        size = len(ranks)
        return cls(size=size, rank=rank, group=group,
                   next_rank=ranks[rank + 1] if rank + 1 < size else None,
                   prev_rank=ranks[rank - 1] if rank > 0 else None, last_rank=ranks[-1])

    def broadcast_from_last(self, t: torch.Tensor) -> torch.Tensor:
        """Every stage gets the last stage's ``t`` (same shape and dtype on all stages), in place."""
        if self.size > 1:
            dist.broadcast(t, src=self.last_rank, group=self.group)
        return t

    def all_reduce(self, t: torch.Tensor) -> torch.Tensor:
        """Sum over the stages of this pipeline, in place."""
        if self.size > 1:
            dist.all_reduce(t, group=self.group)
        return t


# ------------------------------------------------------------------ stage-to-stage transfers


class StageLink:
    """Point-to-point messages between this stage and its neighbours.

    Forward messages (activations) carry a header; backward messages (gradients of the
    activations a stage sent) do not: ``specs`` of what was sent tell their layout.
    Activations arrive as fresh tensors (never views of a reused buffer).
    """

    def __init__(self, layout: PipelineLayout, device):
        self.layout = layout
        self.device = torch.device(device)
        # Headers travel on the device the backend communicates from (CUDA for NCCL).
        nccl = layout.size > 1 and dist.get_backend(layout.group) == "nccl"
        self.header_device = self.device if nccl else torch.device("cpu")

    # -- primitives (return works to wait on, or receive buffers)
    def _isend(self, t, peer):
        return dist.isend(t, dst=peer, group=self.layout.group)

    def _header_out(self, tensors):
        specs = specs_of(tensors)
        return specs, encode_header(specs).to(self.header_device)

    def _recv_header(self, peer) -> list[Spec | None]:
        h = torch.empty(HEADER_LEN, dtype=torch.int64, device=self.header_device)
        dist.recv(h, src=peer, group=self.layout.group)
        return decode_header(h.cpu())

    @staticmethod
    def _wait(works):
        for w in works:
            if w is not None:
                w.wait()

    def _batch(self, ops) -> None:
        ops = [op for op in ops if op is not None]
        if ops:
            self._wait(dist.batch_isend_irecv(ops))

    def _op(self, fn, t, peer):
        if t.numel() == 0:
            return None
        return dist.P2POp(fn, t, peer, group=self.layout.group)

    # -- forward direction
    def send_forward(self, tensors: Sequence[torch.Tensor | None]) -> list:
        """Start sending activations to the next stage; returns works (and keeps the buffers alive)."""
        if self.layout.is_last:
            return []
        specs, header = self._header_out(tensors)
        buf = pack_tensors(tensors, self.device)
        peer = self.layout.next_rank
        works = [self._isend(header, peer)]
        if buf.numel():
            works.append(self._isend(buf, peer))
        return [_Pending(w, (header, buf)) for w in works]

    def recv_forward(self) -> list[torch.Tensor | None] | None:
        if self.layout.is_first:
            return None
        peer = self.layout.prev_rank
        specs = self._recv_header(peer)
        buf = torch.empty(packed_nbytes(specs), dtype=torch.uint8, device=self.device)
        if buf.numel():
            dist.recv(buf, src=peer, group=self.layout.group)
        return unpack_tensors(buf, specs)

    # -- backward direction
    def send_backward(self, grads: Sequence[torch.Tensor | None]) -> None:
        if self.layout.is_first:
            return
        buf = pack_tensors(grads, self.device)
        self._batch([self._op(dist.isend, buf, self.layout.prev_rank)])

    def recv_backward(self, specs: Sequence[Spec | None]) -> list[torch.Tensor | None] | None:
        if self.layout.is_last:
            return None
        buf = torch.empty(packed_nbytes(specs), dtype=torch.uint8, device=self.device)
        self._batch([self._op(dist.irecv, buf, self.layout.next_rank)])
        return unpack_tensors(buf, specs)

    # -- the two combined steps of 1F1B (one batch per neighbour pair)
    def send_forward_recv_backward(self, tensors: Sequence[torch.Tensor | None]) -> list[torch.Tensor | None] | None:
        if self.layout.is_last:
            return None
        specs, header = self._header_out(tensors)
        peer = self.layout.next_rank
        hw = self._isend(header, peer)  # the receiver needs it before it can post the payload receive
        out = pack_tensors(tensors, self.device)
        grads = torch.empty(packed_nbytes(specs), dtype=torch.uint8, device=self.device)
        self._batch([self._op(dist.isend, out, peer), self._op(dist.irecv, grads, peer)])
        hw.wait()
        return unpack_tensors(grads, specs)

    def send_backward_recv_forward(self, grads: Sequence[torch.Tensor | None]) -> list[torch.Tensor | None] | None:
        if self.layout.is_first:
            return None
        peer = self.layout.prev_rank
        specs = self._recv_header(peer)
        out = pack_tensors(grads, self.device)
        buf = torch.empty(packed_nbytes(specs), dtype=torch.uint8, device=self.device)
        self._batch([self._op(dist.isend, out, peer), self._op(dist.irecv, buf, peer)])
        return unpack_tensors(buf, specs)


class _Pending:
    """A started send and the buffers it reads (kept alive until it completes)."""

    def __init__(self, work, keep):
        self.work, self.keep = work, keep

    def wait(self):
        self.work.wait()
        self.keep = None


def wait_all(pending: Sequence[_Pending]) -> None:
    for p in pending:
        p.wait()


# ------------------------------------------------------------------ schedules

_MAX_PENDING_SENDS = 4  # header + payload of two items
StepFn = Callable[[int, "list[torch.Tensor | None] | None"], object]


@torch.no_grad()
def forward_sweep(num_items: int, step: StepFn, link: StageLink) -> list:
    """Forward-only pipelined pass over ``num_items`` items.

    ``step(k, received)`` gets item k's activations from the previous stage (None on the
    first stage) and returns the list of tensors to send on; on the last stage whatever it
    returns is collected. Returns the last stage's results (an empty list elsewhere).
    """
    results, pending = [], []
    for k in range(num_items):
        out = step(k, link.recv_forward())
        if link.layout.is_last:
            results.append(out)
        else:
            pending.extend(link.send_forward(out))
            out = None
        # Bound the sends in flight (each holds a packed copy of an activation): two items
        # ahead of the next stage is all a balanced pipeline needs.
        while len(pending) > _MAX_PENDING_SENDS:
            pending.pop(0).wait()
    wait_all(pending)
    return results


def _as_inputs(received):
    """Received activations become leaves that collect their gradient."""
    if received is None:
        return None
    return [t.requires_grad_(True) if t is not None and t.is_floating_point() else t for t in received]


def _input_grads(inputs):
    if inputs is None:
        return None
    return [None if t is None else (t.grad if t.grad is not None else torch.zeros_like(t)) if t.is_floating_point()
            else torch.zeros_like(t) for t in inputs]


def one_f_one_b(num_items: int, step: StepFn, link: StageLink,
                before_backward: Callable[[bool], None] | None = None) -> None:
    """1F1B with-grad schedule over ``num_items`` items.

    ``step(k, inputs)`` runs item k's forward on this stage with grad; ``inputs`` are the
    received activations as leaves requiring grad (None on the first stage). It returns the
    list of tensors to send on, or on the last stage the scalar loss to backpropagate.
    Parameter gradients accumulate in ``.grad`` as with ``loss.backward()``.
    ``before_backward(last)`` runs before each item's backward, ``last`` True for the final one
    (ZeRO-3 reduces gradients there only: ``parallel.fsdp.set_gradient_sync``).
    """
    layout = link.layout
    warmup = min(layout.size - layout.rank - 1, num_items)
    steady = num_items - warmup
    in_flight: deque = deque()

    def forward(k, received):
        inputs = _as_inputs(received)
        with torch.enable_grad():
            out = step(k, inputs)
        in_flight.append((inputs, out))
        return out

    backwards_left = [num_items]

    def backward(grads):
        inputs, out = in_flight.popleft()
        backwards_left[0] -= 1
        if before_backward is not None:
            before_backward(backwards_left[0] == 0)
        if layout.is_last:
            if out.requires_grad:
                out.backward()
        else:
            roots = [(t, g) for t, g in zip(out, grads) if t is not None and t.requires_grad]
            if roots:
                torch.autograd.backward([t for t, _ in roots], [g for _, g in roots])
        return _input_grads(inputs)

    for k in range(warmup):  # never the last stage
        wait_all(link.send_forward(forward(k, link.recv_forward())))
    received = link.recv_forward() if steady > 0 else None
    for i in range(steady):
        out = forward(warmup + i, received)
        grads = link.send_forward_recv_backward(out) if not layout.is_last else None
        input_grads = backward(grads)
        if i == steady - 1:
            received = None
            link.send_backward(input_grads)
        else:
            received = link.send_backward_recv_forward(input_grads)
    for _ in range(warmup):
        inputs, out = in_flight[0]
        grads = link.recv_backward(specs_of(out))
        link.send_backward(backward(grads))
