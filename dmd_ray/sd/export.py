"""Export a distilled generator as a diffusers folder that runs in one step.

The folder is the teacher's StableDiffusionPipeline with the generator's UNet and a DDIM scheduler with
"trailing" spacing and set_alpha_to_one: set_timesteps(1) then gives [T-1], and the single DDIM step from T-1
lands on alpha = 1, i.e. returns the UNet's x0 prediction. That is exactly the OneStepGenerator at t = T-1:

    pipe = DiffusionPipeline.from_pretrained(folder)
    image = pipe(prompt, num_inference_steps=1, guidance_scale=1.0).images[0]

guidance_scale must be <= 1: the generator was distilled from the guided teacher and runs unguided.

A multi-step generator (DMD2) is exported with diffusers' LCMScheduler, which alternates the same two moves as
MultiStepGenerator: x0 from the UNet, then re-noise with fresh noise to the next timestep. With
original_inference_steps = n its set_timesteps(n) gives (n - k) * (T // n) - 1, the timesteps the generator was trained
at (checked at export); its boundary-condition scalings are 1 and ~1e-8 at those timesteps (timestep_scaling 10):

    image = pipe(prompt, num_inference_steps=n, guidance_scale=1.0).images[0]
"""
from __future__ import annotations

import json

import torch
from torch import nn

from dmd_ray.sd.resolve import GENERATOR_FORMAT, GENERATOR_INFO
from dmd_ray.sd.teacher import Teacher

ONE_STEP_NOTE = "Run with num_inference_steps=1 and guidance_scale=1.0: the generator is distilled from the guided teacher."


def one_step_scheduler(teacher_scheduler, timestep: int):
    from diffusers import DDIMScheduler

    num_train_timesteps = teacher_scheduler.config.num_train_timesteps
    if timestep != num_train_timesteps - 1:
        raise ValueError(
            f"the exported scheduler reproduces a generator at t = {num_train_timesteps - 1} only; this one runs at t = {timestep}"
        )
    return DDIMScheduler.from_config(teacher_scheduler.config, timestep_spacing="trailing", set_alpha_to_one=True, steps_offset=0, clip_sample=False)


def multi_step_scheduler(teacher_scheduler, timesteps: list[int]):
    from diffusers import LCMScheduler

    steps = len(timesteps)
    scheduler = LCMScheduler.from_config(teacher_scheduler.config, original_inference_steps=steps, timestep_scaling=10.0,
                                         clip_sample=False, thresholding=False, set_alpha_to_one=True)
    scheduler.set_timesteps(steps)
    if [int(t) for t in scheduler.timesteps] != list(timesteps):
        raise ValueError(f"diffusers' LCMScheduler runs {steps} steps at {scheduler.timesteps.tolist()}, not at the generator's {list(timesteps)}")
    return scheduler


def export_generator(teacher, generator_unet: nn.Module, uri: str, timestep: int, metadata: dict | None = None,
                     dtype: torch.dtype = torch.float32, timesteps: list[int] | None = None) -> str:
    """Writes the pipeline folder at `uri` (a local folder, atomically, or an s3:// prefix) with weights in `dtype`,
    and returns it: one-step at `timestep`, or, given several `timesteps`, a multi-step generator."""
    unet = generator_unet.to(dtype).eval().requires_grad_(False)
    if timesteps and len(timesteps) > 1:
        scheduler = multi_step_scheduler(teacher.scheduler, timesteps)
        info = {"generator_timestep": timesteps[0], "generator_timesteps": list(timesteps),
                "usage": f"Run with num_inference_steps={len(timesteps)} and guidance_scale=1.0: the generator is distilled from the guided teacher."}
    else:
        scheduler = one_step_scheduler(teacher.scheduler, timestep)
        info = {"generator_timestep": timestep, "usage": ONE_STEP_NOTE}
    exported = Teacher(teacher.tokenizer, teacher.text_encoder.to(dtype), unet, teacher.vae.to(dtype), scheduler, source=uri)
    info = {"format": GENERATOR_FORMAT, **info, **(metadata or {})}
    return exported.publish(uri, {GENERATOR_INFO: json.dumps(info, indent=1).encode()})
