"""The teacher's ODE sampler as pair generation and evaluation use it: diffusers scheduler families by name, and
guided sampling of (prompt, seed) batches."""
from __future__ import annotations

from typing import Any

import torch

from dmd_ray import compile_cache
from dmd_ray.method.denoiser import GuidedDenoiser
from dmd_ray.method.sampling import ode_sample, seeded_noise
from dmd_ray.sd.teacher import pad_rows

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


class PairSampler:
    """The teacher's guided ODE sampler on (prompt, seed) batches: returns (noise, target) latents, noise drawn on
    the CPU from each seed (the same on every device). Guidance runs both branches in one batched call.

    `compile_mode` (None: eager) compiles the UNet with static shapes; with `batch_size`, shorter batches (a shard's
    last) are padded to it, so that one graph per step serves every call (with "reduce-overhead": CUDA graphs)."""

    def __init__(self, teacher, *, sampler: str, steps: int, guidance_scale: float, resolution: int, device: torch.device,
                 dtype: torch.dtype, compile_mode: str | None = None, batch_size: int = 0):
        self.teacher = teacher.to(device=device, dtype=dtype)
        self.latent_shape = teacher.latent_shape(resolution)
        self.scheduler = make_scheduler(sampler, teacher.scheduler)
        self.steps, self.device, self.dtype = steps, device, dtype
        self.batch_size = batch_size if compile_mode else 0
        net = teacher.denoiser()
        if compile_mode:
            compile_cache.stable_keys()  # the pair actors of one node share their kernels through Inductor's cache
            compiled = torch.compile(net, mode=compile_mode, dynamic=False)

            def net(x_t, t, cond):
                torch.compiler.cudagraph_mark_step_begin()  # the previous step's output has been consumed
                return compiled(x_t, t, cond)

        uncond = teacher.uncond_embedding() if guidance_scale != 1.0 else None
        self.denoiser = GuidedDenoiser(net, guidance_scale, uncond)

    @torch.inference_mode()
    def __call__(self, prompts: list[str], seeds: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
        noise = torch.stack([seeded_noise(s, self.latent_shape) for s in seeds])
        cond = self.teacher.encode_prompts(prompts).to(self.device, self.dtype)
        x_T = pad_rows(noise.to(self.device, self.dtype), self.batch_size)  # (only when compiled) rows dropped below
        cond = pad_rows(cond, self.batch_size)
        x = ode_sample(self.denoiser, self.scheduler, x_T, cond, self.steps)[: len(seeds)]
        return noise, x.float().cpu()
