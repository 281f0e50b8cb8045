"""Denoisers: any callable (x_t, t, condition) -> prediction.

A 2D MLP and a Stable Diffusion UNet both fit this shape, so the sampler, the losses and the generator below
never know which one they drive. Two wrappers add what DMD needs on top of a raw network:

- `GuidedDenoiser`: classifier-free guidance, uncond + scale * (cond - uncond), in the network's own prediction
  type. Used by the teacher's ODE sampler and by the real score of the DM loss (the fake score is never guided).
- `X0Denoiser`: reads x0 out of the prediction (float64 maths, see schedule.py); the form the DM loss works in.
"""
from __future__ import annotations

from typing import Any, Callable, Protocol

import torch
from torch import Tensor

from dmd_ray.method.schedule import NoiseSchedule, check_prediction_type


class Denoiser(Protocol):
    def __call__(self, x_t: Tensor, t: Tensor, cond: Any) -> Tensor: ...


def _batch_condition(cond: Any, batch_size: int) -> Any:
    """Broadcasts a condition with batch dimension 1 (e.g. one empty-prompt embedding) to `batch_size`."""
    if cond is None:
        return None
    if isinstance(cond, Tensor):
        if cond.shape[0] == batch_size:
            return cond
        if cond.shape[0] == 1:
            return cond.expand(batch_size, *cond.shape[1:])
        raise ValueError(f"condition has batch size {cond.shape[0]}; expected 1 or {batch_size}")
    if isinstance(cond, dict):
        return {k: _batch_condition(v, batch_size) for k, v in cond.items()}
    raise TypeError(f"conditions must be tensors, dicts of tensors or None, not {type(cond).__name__}")


def concat_conditions(conds: list[Any]) -> Any:
    """Conditions of several batches as one: tensors, dicts of tensors, or None (unconditional)."""
    if conds[0] is None or len(conds) == 1:
        return conds[0]
    if isinstance(conds[0], Tensor):
        return torch.cat(conds)
    return {k: torch.cat([c[k] for c in conds]) for k in conds[0]}


class GuidedDenoiser:
    """Classifier-free guidance around a conditional denoiser.

    `uncond` is the null condition (the empty prompt's embedding for text-to-image; batch dimension 1 or B).
    Both branches run in one batched call. A scale of 1 calls the network once, on the condition alone.
    """

    def __init__(self, net: Callable[[Tensor, Tensor, Any], Tensor], guidance_scale: float = 1.0, uncond: Any = None):
        if guidance_scale != 1.0 and uncond is None:
            raise ValueError("classifier-free guidance (scale != 1) needs the unconditional condition `uncond`")
        self.net = net
        self.guidance_scale = float(guidance_scale)
        self.uncond = uncond

    def __call__(self, x_t: Tensor, t: Tensor, cond: Any) -> Tensor:
        if self.guidance_scale == 1.0:
            return self.net(x_t, t, cond)
        b = x_t.shape[0]
        both = self.net(
            torch.cat([x_t, x_t]),
            torch.cat([t, t]),
            concat_conditions([_batch_condition(self.uncond, b), _batch_condition(cond, b)]),
        )
        uncond_out, cond_out = both.float().chunk(2)
        return uncond_out + self.guidance_scale * (cond_out - uncond_out)


class X0Denoiser:
    """A denoiser of any prediction type, seen as an x0 (mean) predictor: mu(x_t, t, c)."""

    def __init__(self, denoiser: Denoiser, schedule: NoiseSchedule, prediction_type: str):
        check_prediction_type(prediction_type)
        self.denoiser = denoiser
        self.schedule = schedule
        self.prediction_type = prediction_type

    def __call__(self, x_t: Tensor, t: Tensor, cond: Any) -> Tensor:
        return self.schedule.to_x0(self.denoiser(x_t, t, cond), x_t, t, self.prediction_type)
