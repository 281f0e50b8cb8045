"""Real samples for DMD2's GAN (`--gan-real renders`): a domain's real images for the run's prompts, encoded once by
the teacher's VAE at the start of a run, then drawn from at every fake-score update.

Why real images: DMD2 beats its teacher because its discriminator sees real data, not the teacher's outputs; with
the teacher's pair outputs as "real" the GAN can only pull the student toward the teacher, its mistakes included.
A bank of a few thousand latents (8,192 x 4x8x8 floats is 8 MiB for the demo) costs the step no host work, where
drawing images at every step would. The images come from a `real_images` object the job passes in (the shapes
domain's renderer for the demo teacher: demos/shapes.py `Renderer`).
"""
from __future__ import annotations

import torch
from torch import Tensor

from dmd_ray.method.transfer import to_device


class RealLatentBank:
    """`size` latents of `real_images(prompts, seed, resolution, device)` for prompts drawn uniformly from the
    conditions' set with `seed`, and `draw(n, rng)`: n of them with their prompts' conditions (DMDStep.draw_real)."""

    def __init__(self, teacher, conditions, real_images, size: int, resolution: int, seed: int = 0, chunk: int = 512):
        self.conditions = conditions
        self.prompt_index = torch.randint(0, len(conditions.prompts), (size,), generator=torch.Generator().manual_seed(seed))
        latents = []
        for start in range(0, size, chunk):
            prompts = [conditions.prompts[i] for i in self.prompt_index[start:start + chunk].tolist()]
            latents.append(teacher.encode(real_images(prompts, seed * 1_000_003 + start, resolution, conditions.device)).float())
        self.latents = torch.cat(latents)

    def __len__(self) -> int:
        return len(self.latents)

    def draw(self, n: int, rng: torch.Generator) -> tuple[Tensor, Tensor]:
        chosen = torch.randint(0, len(self), (n,), generator=rng)
        prompts = [self.conditions.prompts[i] for i in self.prompt_index[chosen].tolist()]
        return self.latents[to_device(chosen, self.latents.device)], self.conditions.encode(prompts)
