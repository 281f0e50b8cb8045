"""Export a distilled generator as a diffusers folder that runs in one step.

The folder is the teacher's StableDiffusionPipeline with the generator's UNet and a DDIM scheduler with
"trailing" spacing and set_alpha_to_one: set_timesteps(1) then gives [T-1], and the single DDIM step from T-1
lands on alpha = 1, i.e. returns the UNet's x0 prediction. That is exactly the OneStepGenerator at t = T-1:

    pipe = DiffusionPipeline.from_pretrained(folder)
    image = pipe(prompt, num_inference_steps=1, guidance_scale=1.0).images[0]

guidance_scale must be <= 1: the generator was distilled from the guided teacher and runs unguided.
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


def export_generator(teacher, generator_unet: nn.Module, uri: str, timestep: int, metadata: dict | None = None,
                     dtype: torch.dtype = torch.float32) -> str:
    """Writes the one-step pipeline folder at `uri` (a local folder, atomically, or an s3:// prefix) with weights in
    `dtype`, and returns it."""
    unet = generator_unet.to(dtype).eval().requires_grad_(False)
    exported = Teacher(teacher.tokenizer, teacher.text_encoder.to(dtype), unet, teacher.vae.to(dtype), one_step_scheduler(teacher.scheduler, timestep), source=uri)
    info = {"format": GENERATOR_FORMAT, "generator_timestep": timestep, "usage": ONE_STEP_NOTE, **(metadata or {})}
    return exported.publish(uri, {GENERATOR_INFO: json.dumps(info, indent=1).encode()})
