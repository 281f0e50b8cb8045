"""The teacher's deterministic ODE sampler, batched: a diffusers scheduler driven by a (guided) denoiser.

`ode_sample(denoiser, scheduler, noise, cond, num_steps)` works with any diffusers scheduler whose `step` is
deterministic given the model output (DDIM with eta = 0, PNDM/PLMS, Euler, Heun, DPM-Solver++, UniPC, ...). The
scheduler passed in is never mutated: a fresh copy holds the per-call state (PNDM keeps a history).
"""
from __future__ import annotations

import inspect
from typing import Any

import torch
from torch import Tensor

from dmd_ray.denoiser import Denoiser

SAMPLERS = {
    "ddim": "DDIMScheduler",
    "pndm": "PNDMScheduler",
    "euler": "EulerDiscreteScheduler",
    "dpmpp": "DPMSolverMultistepScheduler",
    "unipc": "UniPCMultistepScheduler",
}


def make_scheduler(sampler: str, base_scheduler_or_config: Any):
    """A scheduler of the named family with the teacher's training schedule (betas, prediction type, offsets)."""
    import diffusers

    if sampler not in SAMPLERS:
        raise ValueError(f"unknown sampler {sampler!r}; expected one of {sorted(SAMPLERS)}")
    config = getattr(base_scheduler_or_config, "config", base_scheduler_or_config)
    cls = getattr(diffusers, SAMPLERS[sampler])
    overrides = {"skip_prk_steps": True} if sampler == "pndm" else {}  # PLMS only, as SD pipelines use it
    if sampler == "ddim":
        overrides["clip_sample"] = False  # a deterministic ODE step, no clipping of x0
    return cls.from_config(config, **overrides)


@torch.no_grad()
def ode_sample(denoiser: Denoiser, scheduler: Any, noise: Tensor, cond: Any = None, num_steps: int = 50) -> Tensor:
    """Integrates the probability-flow ODE from `noise` (standard normal) with `num_steps` scheduler steps.

    `denoiser` returns the prediction type the scheduler was configured with (wrap it in GuidedDenoiser for CFG).
    """
    scheduler = type(scheduler).from_config(scheduler.config)
    scheduler.set_timesteps(num_steps, device=noise.device)
    step_params = inspect.signature(scheduler.step).parameters
    step_kwargs = {"eta": 0.0} if "eta" in step_params else {}
    x = noise * scheduler.init_noise_sigma
    for t in scheduler.timesteps:
        model_input = scheduler.scale_model_input(x, t)
        # some schedulers (Euler, Heun) step on fractional timesteps: pass them on as they are
        t_batch = t.reshape(1).expand(x.shape[0]).to(x.device)
        prediction = denoiser(model_input, t_batch, cond)
        x = scheduler.step(prediction.to(x.dtype), t, x, return_dict=False, **step_kwargs)[0]
    return x
