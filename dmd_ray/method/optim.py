"""Optimisation pieces shared by every training loop: learning-rate schedules, AdamW, and an update function."""
from __future__ import annotations

import contextlib
import itertools
import math

import torch
from torch import Tensor

from dmd_ray.method.objective import Update

LR_SCHEDULES = ("constant", "cosine", "warmup_times_cosine")


def lr_multiplier(step: int, warmup: int, total: int = 0, schedule: str = "constant") -> float:
    """The learning rate's factor at `step` (counted from 0): linear warm-up over `warmup` steps (the first step
    already moves, at 1/warmup), then constant (DMD) or cosine annealing to 0 at `total`. "warmup_times_cosine" is
    the demo teacher's recipe: the warm-up ramp times a cosine over all `total` steps."""
    if schedule == "warmup_times_cosine":
        return min(1.0, (step + 1) / warmup) * 0.5 * (1 + math.cos(math.pi * min(step, total) / total))
    if step < warmup:
        return (step + 1) / warmup
    if schedule == "constant":
        return 1.0
    if schedule == "cosine":
        return 0.5 * (1 + math.cos(math.pi * min(1.0, (step - warmup) / max(1, total - warmup))))
    raise ValueError(f"unknown lr schedule {schedule!r}; expected one of {LR_SCHEDULES}")


def warmup_schedule(optimizer: torch.optim.Optimizer, warmup: int, total: int = 0, schedule: str = "constant"):
    """A LambdaLR over `lr_multiplier`: a function of the step, so a resumed run replays it exactly."""
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: lr_multiplier(s, warmup, total, schedule))


def adamw(params, lr: float, warmup: int, total: int = 0, schedule: str = "constant", weight_decay: float = 0.01,
          betas: tuple[float, float] = (0.9, 0.999), fused: bool = False):
    """DMD's optimiser (AdamW, wd 0.01, betas 0.9/0.999) with its warm-up schedule: (optimizer, scheduler).
    `fused`: torch's one-kernel AdamW (GPU) instead of its per-tensor loop."""
    optimizer = torch.optim.AdamW(params, lr=lr, betas=betas, weight_decay=weight_decay, fused=fused or None)
    return optimizer, warmup_schedule(optimizer, warmup, total, schedule)


def optimizer_update(optimizer: torch.optim.Optimizer, params, grad_clip: float, scheduler=None) -> Update:
    """An `Update` for a plain torch optimiser: zero, backward, clip, step (and the lr schedule)."""
    params = list(params)

    def update(loss: Tensor) -> Tensor:
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        norm = torch.nn.utils.clip_grad_norm_(params, grad_clip)
        optimizer.step()
        if scheduler is not None:
            scheduler.step()
        return norm.detach()

    return update


class WeightAverage:
    """An exponential moving average of a network's floating-point weights, the weights a run ships when it keeps
    one (the demo teacher; a DMD generator with ema_decay > 0). `update`, after each optimizer step, is one
    multi-tensor lerp over the tensors taken when it was built (no walk of the module tree per step); `shadow` is
    keyed as the module's state_dict, so a checkpoint or an export reads it as weights."""

    def __init__(self, module: torch.nn.Module, decay: float):
        if not 0.0 <= decay < 1.0:  # 0: the "average" is the last weights
            raise ValueError(f"the average's decay must be in [0, 1), got {decay}")
        self.decay = decay
        self.tracked = {k: v for k, v in module.state_dict(keep_vars=True).items() if v.is_floating_point()}
        self.shadow = {k: v.detach().clone().float() for k, v in self.tracked.items()}

    @torch.no_grad()
    def update(self, count: int | None = None) -> None:
        """`count`, this update's number from 1, warms the average up: the decay is at most 1 - 1/count, so that up to
        1/(1 - decay) updates the average is the plain mean of the weights so far. Without it the starting weights
        (a teacher's, for a run from the teacher) keep decay**count of it: 13% after 2,000 steps at 0.999."""
        decay = self.decay if count is None else min(self.decay, 1.0 - 1.0 / count)
        torch._foreach_lerp_(list(self.shadow.values()), [v.detach().float() for v in self.tracked.values()], 1 - decay)

    def load(self, tensors: dict[str, Tensor]) -> None:
        """The average of a checkpoint, which must hold every tracked weight."""
        missing = sorted(set(self.shadow) - set(tensors))
        if missing:
            raise ValueError(f"the saved weight average lacks {len(missing)} of the network's weights, e.g. {missing[:3]}")
        for k, v in self.shadow.items():
            v.copy_(tensors[k])

    @contextlib.contextmanager
    def swapped_in(self):
        """The network runs with the averaged weights inside the block and gets its own back after it (in place:
        compiled graphs and optimizer state keep pointing at the same tensors)."""
        own = {k: v.detach().clone() for k, v in self.tracked.items()}
        for k, v in self.tracked.items():
            v.detach().copy_(self.shadow[k])
        try:
            yield
        finally:
            for k, v in self.tracked.items():
                v.detach().copy_(own[k])


class FlatParameters:
    """A network's trainable parameters as views of one flat buffer, and after each backward their gradients gathered
    into one flat gradient: an optimizer and a clipping norm over `flat` then run one kernel each, where over the
    parameters they run multi-tensor loops whose host time per parameter dominates a small network's step on a GPU
    (BENCHMARKS.md, issue 14). The network's parameters stay what the module, its checkpoints and exports see. Each
    view starts at a multiple of `ALIGN` elements: compiled kernels assume aligned inputs and copy the ones that are
    not; the gaps hold zeros, with zero gradients. The views are contiguous unless `relayout` makes the convolution
    weights channels-last; gradients are gathered in each view's memory order."""

    ALIGN = 32  # elements: 128 bytes of float32

    def __init__(self, params):
        self.params = [p for p in params if p.requires_grad]
        sizes = [p.numel() for p in self.params]
        self.gaps = [-n % self.ALIGN for n in sizes]
        reference = self.params[0].detach()
        buffer = reference.new_zeros(sum(sizes) + sum(self.gaps))
        self.zeros = reference.new_zeros(self.ALIGN)
        self.offsets = list(itertools.accumulate((n + gap for n, gap in zip(sizes, self.gaps)), initial=0))[:-1]
        for p, n, offset in zip(self.params, sizes, self.offsets):  # the weights now live in the buffer: an update of `flat` updates the network
            view = buffer[offset : offset + n].view(p.shape)  # the standard layout (relayout changes it)
            view.copy_(p.detach())
            p.data = view
        self.flat = torch.nn.Parameter(buffer)
        # per parameter, the dimension order its weights have in memory (None: the standard one), taken once here and
        # in relayout, not per step: gather_gradients runs on the host-bound hot path
        self.memory_orders: list[tuple[int, ...] | None] = [None] * len(self.params)

    def relayout(self, memory_format: torch.memory_format, optimizer: torch.optim.Optimizer) -> None:
        """Each 4-D weight re-viewed in `memory_format` (torch.channels_last) inside its own slice of the buffer, its
        values kept: a layout that DeepSpeed's engine set-up does not take (it broadcasts weights as bytes, which needs
        a unit last stride), so it is applied after, before the first step. `optimizer`'s per-element state (AdamW's
        moments over `flat`) follows the buffer's memory order; its state dicts hold it in the standard (contiguous)
        order, so that a checkpoint resumes under either layout."""
        for i, (p, offset) in enumerate(zip(self.params, self.offsets)):
            if p.dim() == 4:
                value = p.detach().clone()
                view = self.flat.detach().as_strided(p.shape, value.contiguous(memory_format=memory_format).stride(), offset)
                view.copy_(value)
                p.data = view
                order = tuple(sorted(range(4), key=lambda d: -p.stride(d)))  # stable: dims of size 1 keep their place
                self.memory_orders[i] = None if order == (0, 1, 2, 3) else order
        optimizer.register_state_dict_post_hook(lambda _, state: self._reordered(state, to_standard=True))
        optimizer.register_load_state_dict_pre_hook(lambda _, state: self._reordered(state, to_standard=False))

    def _reordered(self, state_dict: dict, to_standard: bool) -> dict:
        """A copy of an optimizer state dict whose tensors over `flat` are reordered from the buffer's memory order to
        the standard one, or back (the live state is never touched)."""
        def reorder(t):
            if not isinstance(t, Tensor) or t.shape != self.flat.shape:
                return t
            t = t.contiguous()
            out = t.clone()
            for p, offset in zip(self.params, self.offsets):
                if p.is_contiguous():
                    continue
                if to_standard:
                    out[offset : offset + p.numel()] = t.as_strided(p.shape, p.stride(), t.storage_offset() + offset).reshape(-1)
                else:
                    out.as_strided(p.shape, p.stride(), offset).copy_(t[offset : offset + p.numel()].view(p.shape))
            return out

        return {**state_dict, "state": {k: {name: reorder(v) for name, v in entry.items()} for k, entry in state_dict["state"].items()}}

    def gather_gradients(self) -> None:
        """`flat.grad` from the parameters' gradients (zeros for a parameter that got none, and in the gaps)."""
        pieces = []
        for p, gap, order in zip(self.params, self.gaps, self.memory_orders):
            grad = p.grad if p.grad is not None else torch.zeros_like(p)
            # in the weights' memory order: a view, since autograd gives a gradient its parameter's strides
            pieces.append(grad.reshape(-1) if order is None else grad.permute(order).reshape(-1))
            if gap:
                pieces.append(self.zeros[:gap])
        self.flat.grad = torch.cat(pieces)

    def clip_gradients(self, max_norm: float) -> Tensor:
        """Scales `flat.grad` to a norm of at most `max_norm`, as torch's clip_grad_norm_ does, and returns the norm
        before, accumulated in float64 (one float32 sum over millions of gradients drifts by 1e-5 relative on a CPU,
        where the per-parameter norms do not)."""
        norm = torch.linalg.vector_norm(self.flat.grad, dtype=torch.float64).float()
        self.flat.grad.mul_((max_norm / (norm + 1e-6)).clamp(max=1.0))
        return norm

    def drop_gradients(self) -> None:
        for p in self.params:
            p.grad = None
        self.flat.grad = None

