"""The teacher's deterministic ODE sampler, batched: a diffusers scheduler driven by a (guided) denoiser.

`ode_sample(denoiser, scheduler, noise, cond, num_steps)` works with any diffusers-style scheduler (duck-typed:
`from_config`, `set_timesteps`, `scale_model_input`, `step`; dmd_ray.sd.teacher_sampler.make_scheduler makes them) whose `step` is
deterministic given the model output (DDIM with eta = 0, PNDM/PLMS, Euler, Heun, DPM-Solver++, UniPC, ...). The
scheduler passed in is never mutated: a fresh copy holds the per-call state (PNDM keeps a history).
"""
from __future__ import annotations

import inspect
from typing import Any

import torch
from torch import Tensor

from dmd_ray.method.denoiser import Denoiser


def seeded_noise(seed: int, shape: tuple[int, ...]) -> Tensor:
    """Standard normal noise of `shape` from a CPU generator seeded `seed`, in float32: the same on every machine
    and device, and what diffusers' pipelines draw for `generator=torch.Generator().manual_seed(seed)`."""
    return torch.randn(tuple(shape), generator=torch.Generator("cpu").manual_seed(int(seed)), dtype=torch.float32)


def seeded_noise_draws(seed: int, shape: tuple[int, ...], count: int) -> Tensor:
    """`count` successive draws of `shape` from one CPU generator seeded `seed`, stacked: the first is
    seeded_noise(seed, shape), the later ones a multi-step generator's re-noising, in the order diffusers' pipelines
    draw them for one image with `generator=torch.Generator().manual_seed(seed)` (the latents, then one per step)."""
    cpu = torch.Generator("cpu").manual_seed(int(seed))
    return torch.stack([torch.randn(tuple(shape), generator=cpu, dtype=torch.float32) for _ in range(count)])


def generate_from_seeds(generator: Any, seeds: list[int], latent_shape: tuple[int, ...], cond: Any, device: torch.device | str) -> Tensor:
    """Latents of a one-step or multi-step generator (`timesteps`), each sample drawn from its own seed alone, so that
    an image does not depend on the batch it was made in; a multi-step sample is the image diffusers' pipeline of the
    export makes from that seed."""
    steps = len(getattr(generator, "timesteps", [0]))
    draws = torch.stack([seeded_noise_draws(seed, latent_shape, steps) for seed in seeds]).to(device)  # [batch, steps, ...]
    if steps == 1:
        return generator(draws[:, 0], cond)
    return generator(draws[:, 0], cond, step_noise=list(draws[:, 1:].unbind(1)))


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
