"""A tiny latent decoder for the demo teacher: TAESD's architecture (diffusers AutoencoderTiny), distilled from the
teacher's own VAE on the latents a generator produces, and its quality cost measured with the shapes judge.

    python -m dmd_ray.demos.tiny_decoder --out dmd_ray/assets/demo-tiny-decoder

The demo VAE upsamples 4x (8x8 latents to 32x32 images), so the decoder has two upsampling stages where SD's TAESD
has three; both are AutoencoderTiny configs, so `resolve.load_tiny_decoder` loads this one and SD users' TAESD
weights (madebyollin/taesd) the same way. Training pairs: latents z and the full VAE's decode(z), z being
  - the demo generator's outputs for random prompts (what the service decodes), and
  - the VAE encoder's latents of rendered scenes (the domain's real images),
half and half, so the decoder matches the full one where it is used. Loss: pixel MSE. The encoder half of the
AutoencoderTiny is distilled too (MSE to the VAE encoder's scaled latents), so the folder is a whole, working model.
"""
from __future__ import annotations

import argparse
import json
import os
import random
import time

import torch
import torch.nn.functional as F

from dmd_ray.demos import shapes
from dmd_ray.sd.one_step import GenerationJob, OneStepImageGenerator
from dmd_ray.sd.resolve import BUILT_IN_GENERATORS, load_teacher


def build_tiny_decoder(latent_channels: int, vae_scale_factor: int, channels: int = 64):
    """AutoencoderTiny with log2(vae_scale_factor) upsampling stages (3 for SD: TAESD's own layout)."""
    from diffusers import AutoencoderTiny

    stages = vae_scale_factor.bit_length() - 1
    if 2**stages != vae_scale_factor:
        raise ValueError(f"the VAE's scale factor must be a power of two, got {vae_scale_factor}")
    blocks = (1, *([3] * stages))
    return AutoencoderTiny(latent_channels=latent_channels, encoder_block_out_channels=(channels,) * (stages + 1),
                           decoder_block_out_channels=(channels,) * (stages + 1), num_encoder_blocks=blocks,
                           num_decoder_blocks=tuple(reversed(blocks)))


class TrainingLatents:
    """Batches of (latents, full VAE images): half from the demo generator, half encoded renders."""

    def __init__(self, teacher, generator: OneStepImageGenerator, seed: int = 0):
        self.teacher, self.generator = teacher, generator
        self.rng = random.Random(seed)

    @torch.no_grad()
    def batch(self, n: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(latents, images in [-1, 1] from the full VAE, rendered images whose encoder latents are latents[n//2:])."""
        scenes = shapes.random_scenes(n, self.rng)
        half = n // 2
        jobs = [GenerationJob(s.prompt, (self.rng.randrange(2**31),), self.generator.native_size) for s in scenes[:half]]
        generated = self.generator.latents(jobs)
        renders = shapes.render(scenes[half:], seed=self.rng.randrange(2**31))
        encoded = self.teacher.encode(renders)
        latents = torch.cat([generated, encoded])
        return latents, self.teacher.decode(latents).clamp(-1, 1), renders


def train(steps: int = 1500, batch_size: int = 32, lr: float = 1e-3, seed: int = 0, channels: int = 32, log=print):
    torch.manual_seed(seed)
    teacher = load_teacher("demo")
    generator = OneStepImageGenerator(BUILT_IN_GENERATORS["demo"], "cpu", "float32")
    data = TrainingLatents(teacher, generator, seed)
    model = build_tiny_decoder(int(teacher.unet.config.in_channels), teacher.vae_scale_factor, channels).train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, steps)
    started = time.perf_counter()
    for step in range(1, steps + 1):
        latents, target, renders = data.batch(batch_size)
        decoded = model.decode(latents, return_dict=False)[0]
        encoded = model.encode(renders, return_dict=False)[0]
        loss_decoder = F.mse_loss(decoded, target)
        loss_encoder = F.mse_loss(encoded, latents[batch_size // 2 :])
        optimizer.zero_grad(set_to_none=True)
        (loss_decoder + loss_encoder).backward()
        optimizer.step()
        schedule.step()
        if step % 100 == 0 or step == steps:
            log(f"[tiny-decoder] step {step}/{steps}  decoder mse {loss_decoder.item():.5f}  encoder mse {loss_encoder.item():.5f}  "
                f"{time.perf_counter() - started:.0f} s")
    return model.eval().requires_grad_(False)


def quality(decoder: str, num_samples: int = 360, seed: int = 0) -> dict:
    """The built-in demo generator's images decoded by its VAE and by `decoder`, scored by the shapes judge on the
    evaluation prompts (the rows of jobs/evaluate.py): FID in judge features against renders, prompt accuracy, and
    the mean absolute pixel difference between the two decodes."""
    from dmd_ray.demos.shapes_eval import TrainingProbe

    probe = TrainingProbe(num_samples, seed)
    prompts, seeds = probe.rows()
    full, tiny = (OneStepImageGenerator(BUILT_IN_GENERATORS["demo"], "cpu", "float32", d) for d in ("", decoder))
    jobs = [GenerationJob(p, (s,), full.native_size) for p, s in zip(prompts, seeds)]
    with torch.no_grad():
        images = {name: torch.cat([torch.as_tensor(a) for a in g.generate(jobs)]).numpy() for name, g in (("full_vae", full), ("tiny", tiny))}
    result = {name: probe(imgs, prompts) for name, imgs in images.items()}
    result["mean_abs_pixel_difference"] = float(abs(images["full_vae"].astype("float32") - images["tiny"].astype("float32")).mean())
    return result


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default="runs/demo-tiny-decoder", help="folder for the AutoencoderTiny (safetensors)")
    p.add_argument("--steps", type=int, default=1500)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--channels", type=int, default=32, help="TAESD has 64; 32x32 shapes need fewer")
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--eval-samples", type=int, default=360, help="0: skip the quality comparison")
    args = p.parse_args(argv)
    torch.set_num_threads(max(1, os.cpu_count() or 1))
    model = train(args.steps, args.batch_size, args.lr, args.seed, args.channels)
    model.save_pretrained(args.out, safe_serialization=True)
    print(f"[tiny-decoder] saved to {args.out}")
    if args.eval_samples:
        result = quality(args.out, args.eval_samples, args.seed)
        print("[tiny-decoder] " + json.dumps(result))


if __name__ == "__main__":
    main()
