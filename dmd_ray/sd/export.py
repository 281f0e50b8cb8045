"""Export a distilled generator as a diffusers folder that runs in one step.

The folder is the teacher's StableDiffusionPipeline with the generator's UNet and a DDIM scheduler with
"trailing" spacing and set_alpha_to_one: set_timesteps(1) then gives [T-1], and the single DDIM step from T-1
lands on alpha = 1, i.e. returns the UNet's x0 prediction. That is exactly the OneStepGenerator at t = T-1. A
generator at another timestep t (DMD2's "timestep shift": pure noise read at t = 399) gets the teacher's first t + 1
betas as its schedule (`trained_betas`), so that the same "trailing" single step is [t], with the teacher's alpha
there, and lands on alpha = 1 the same way; the plain call below needs no `timesteps=[t]`. (steps_offset = t with
"leading" spacing would also pick [t], but diffusers' StableDiffusionPipeline resets steps_offset to 1 on load.)

    pipe = DiffusionPipeline.from_pretrained(folder)
    image = pipe(prompt, num_inference_steps=1, guidance_scale=1.0).images[0]

guidance_scale must be <= 1: the generator was distilled from the guided teacher and runs unguided.

A multi-step generator (DMD2) is exported with the scheduler of its sampler (MultiStepGenerator's `sampler`), each
alternating the same two moves as MultiStepGenerator: x0 from the UNet, then re-noise to the next timestep. "ddim":
diffusers' DDIMScheduler ("trailing", set_alpha_to_one, eta 0) re-noises with the UNet's own epsilon; set_timesteps(n)
gives (n - k) * (T // n) - 1, the timesteps the generator was trained at, and its last step lands on alpha = 1. "lcm":
diffusers' LCMScheduler re-noises with fresh noise; with original_inference_steps = n it picks the same timesteps, and
its boundary-condition scalings are 1 and ~1e-8 there (timestep_scaling 10). Both are checked at export:

    image = pipe(prompt, num_inference_steps=n, guidance_scale=1.0).images[0]
"""
from __future__ import annotations

import json
import os

import torch
from torch import nn

from dmd_ray.sd.resolve import GENERATOR_FORMAT, GENERATOR_INFO
from dmd_ray.sd.teacher import Teacher

ONE_STEP_NOTE = "Run with num_inference_steps=1 and guidance_scale=1.0: the generator is distilled from the guided teacher."


def one_step_scheduler(teacher_scheduler, timestep: int):
    from diffusers import DDIMScheduler

    last = teacher_scheduler.config.num_train_timesteps - 1
    if not 0 <= timestep <= last:
        raise ValueError(f"generator timestep {timestep} is outside the teacher's [0, {last}]")
    shifted = {} if timestep == last else {"num_train_timesteps": timestep + 1, "trained_betas": teacher_scheduler.betas[: timestep + 1].tolist()}
    scheduler = DDIMScheduler.from_config(teacher_scheduler.config, timestep_spacing="trailing", set_alpha_to_one=True, steps_offset=0,
                                          clip_sample=False, thresholding=False, **shifted)
    scheduler.set_timesteps(1)
    if [int(t) for t in scheduler.timesteps] != [timestep] or scheduler.alphas_cumprod[timestep] != teacher_scheduler.alphas_cumprod[timestep]:
        raise ValueError(f"diffusers' DDIMScheduler runs one step at {scheduler.timesteps.tolist()}, not at the generator's {timestep}")
    return scheduler


def multi_step_scheduler(teacher_scheduler, timesteps: list[int], sampler: str = "lcm"):
    from diffusers import DDIMScheduler, LCMScheduler

    steps = len(timesteps)
    if sampler == "ddim":
        scheduler = DDIMScheduler.from_config(teacher_scheduler.config, timestep_spacing="trailing", set_alpha_to_one=True, steps_offset=0,
                                              clip_sample=False, thresholding=False)
    elif sampler == "lcm":
        scheduler = LCMScheduler.from_config(teacher_scheduler.config, original_inference_steps=steps, timestep_scaling=10.0,
                                             clip_sample=False, thresholding=False, set_alpha_to_one=True)
    else:
        raise ValueError(f"multi-step sampler must be ddim or lcm, got {sampler!r}")
    scheduler.set_timesteps(steps)
    if [int(t) for t in scheduler.timesteps] != list(timesteps):
        raise ValueError(f"diffusers' {type(scheduler).__name__} runs {steps} steps at {scheduler.timesteps.tolist()}, not at the generator's {list(timesteps)}")
    return scheduler


def exported_sampler(folder: str) -> str:
    """How a multi-step export samples, from its scheduler: "ddim" or "lcm" (the exports before the choice)."""
    with open(os.path.join(folder, "scheduler", "scheduler_config.json")) as f:
        return "ddim" if json.load(f).get("_class_name") == "DDIMScheduler" else "lcm"


def export_generator(teacher, generator_unet: nn.Module, uri: str, timestep: int, metadata: dict | None = None,
                     dtype: torch.dtype = torch.float32, timesteps: list[int] | None = None, sampler: str = "lcm") -> str:
    """Writes the pipeline folder at `uri` (a local folder, atomically, or an s3:// prefix) with weights in `dtype`,
    and returns it: one-step at `timestep`, or, given several `timesteps`, a multi-step generator sampled by `sampler`."""
    unet = generator_unet.to(dtype).eval().requires_grad_(False)
    if timesteps and len(timesteps) > 1:
        scheduler = multi_step_scheduler(teacher.scheduler, timesteps, sampler)
        info = {"generator_timestep": timesteps[0], "generator_timesteps": list(timesteps), "multi_step_sampler": sampler,
                "usage": f"Run with num_inference_steps={len(timesteps)} and guidance_scale=1.0: the generator is distilled from the guided teacher."}
    else:
        scheduler = one_step_scheduler(teacher.scheduler, timestep)
        info = {"generator_timestep": timestep, "usage": ONE_STEP_NOTE}
    exported = Teacher(teacher.tokenizer, teacher.text_encoder.to(dtype), unet, teacher.vae.to(dtype), scheduler, source=uri)
    info = {"format": GENERATOR_FORMAT, **info, **(metadata or {})}
    return exported.publish(uri, {GENERATOR_INFO: json.dumps(info, indent=1).encode()})
