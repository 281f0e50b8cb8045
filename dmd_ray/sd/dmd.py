"""DMD around a diffusers teacher: the objective and the iteration step, built from a DistillConfig.

The Ray Train worker (with DeepSpeed engines) and the benchmark's plain-torch loop (with torch optimisers) both call
`build_step`; they differ only in the networks and update functions they pass in.
"""
from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from torch import nn

from dmd_ray.method.denoiser import GuidedDenoiser, X0Denoiser
from dmd_ray.method.gan import FeatureClassifier, GANLoss
from dmd_ray.method.generator import MultiStepGenerator, OneStepGenerator
from dmd_ray.method.losses import DenoisingLoss, DistributionMatchingLoss, LPIPSDistance, RegressionLoss, squared_l2
from dmd_ray.method.objective import DMDObjective, DMDStep, Update
from dmd_ray.sd.conditioning import PromptConditions
from dmd_ray.sd.teacher import Teacher, feature_channels

if TYPE_CHECKING:
    from dmd_ray.config import DistillConfig


def one_step_timestep(cfg: DistillConfig, num_timesteps: int) -> int:
    """The timestep a one-step generator reads its pure noise at: `generator_timestep`; at -1, the one the exported
    student of `init_generator` was trained at (a student continues where it was trained: the built-in `demo` reads
    t = 399), else T - 1 (DMD's)."""
    if cfg.generator_timestep >= 0:
        return cfg.generator_timestep
    if cfg.init_generator:
        from dmd_ray.sd.resolve import read_generator_info, resolve_generator

        info = read_generator_info(resolve_generator(cfg.init_generator, cfg.cache_dir or None))
        if len(info.get("generator_timesteps", [0])) == 1:
            return int(info.get("generator_timestep", num_timesteps - 1))
    return num_timesteps - 1


def build_objective(cfg: DistillConfig, teacher: Teacher, generator_net: nn.Module, fake_net: nn.Module, device,
                    bare_fake_net: nn.Module | None = None) -> DMDObjective:
    """The generator (the teacher's network at `one_step_timestep`) and the DMD objective around two
    trainable denoisers (UNetDenoiser modules, or DeepSpeed engines wrapping them; then `bare_fake_net` is the fake
    engine's own module, which the generator's GAN term runs)."""
    schedule, prediction_type = teacher.schedule, teacher.prediction_type
    if cfg.generator_steps > 1:
        generator = MultiStepGenerator(generator_net, schedule, prediction_type, generator_timesteps(schedule.num_timesteps, cfg.generator_steps),
                                       cfg.multi_step_sampler)
    else:
        generator = OneStepGenerator(generator_net, schedule, prediction_type, one_step_timestep(cfg, schedule.num_timesteps))
    real_x0 = X0Denoiser(GuidedDenoiser(teacher.denoiser(), cfg.guidance_scale, teacher.uncond_embedding()), schedule, prediction_type)
    if cfg.lambda_reg == 0:
        regression = None  # the "without regression" ablation: no LPIPS network to build (or download)
    elif cfg.regression_space == "pixel":
        lpips = LPIPSDistance(cfg.lpips_backbone, cfg.lpips_pretrained_backbone, cfg.lpips_min_size).to(device)
        regression = RegressionLoss(lpips, decode=teacher.decode)
    else:
        regression = RegressionLoss(squared_l2)
    return DMDObjective(
        generator=generator,
        dm_loss=DistributionMatchingLoss(real_x0, X0Denoiser(fake_net, schedule, prediction_type), schedule, (cfg.t_min, cfg.t_max)),
        fake_loss=DenoisingLoss(schedule, prediction_type),
        regression=regression,
        lambda_reg=cfg.lambda_reg,
        dm_weight=cfg.dm_weight,
        gan=GANLoss(fake_net, schedule, frozen_network=bare_fake_net) if cfg.gan_weight > 0 else None,
        gan_weight=cfg.gan_weight,
        gan_discriminator_weight=cfg.gan_discriminator_weight,
    )


def generator_timesteps(num_timesteps: int, steps: int) -> list[int]:
    """DMD2's multi-step schedule, t_k = (n - k) * (T // n) - 1: 999, 749, 499, 249 for 4 steps of a 1000-step
    teacher. The exports' schedulers pick the same ones (export.py)."""
    if not 1 <= steps <= num_timesteps:
        raise ValueError(f"generator steps must be in [1, {num_timesteps}], got {steps}")
    return [(steps - k) * (num_timesteps // steps) - 1 for k in range(steps)]


def gan_classifier(cfg: DistillConfig, unet: nn.Module) -> nn.Module | None:
    """DMD2's classification head for the fake score's `gan_features` (None without the GAN)."""
    return FeatureClassifier(feature_channels(unet, cfg.gan_features), cfg.gan_features) if cfg.gan_weight > 0 else None


def build_step(cfg: DistillConfig, teacher: Teacher, conditions: PromptConditions, generator_net: nn.Module, fake_net: nn.Module,
               update_generator: Update, update_fake: Update, rng: torch.Generator, dm_batch: int, device,
               bare_fake_net: nn.Module | None = None, draw_real=None) -> DMDStep:
    """One DMD iteration per call on this worker's share of the batch: `step(pair_noise, pair_cond, pair_target)`;
    `draw_real(n, rng)`, where given, gives the GAN's classifier its real samples instead of the pairs' targets."""
    return DMDStep(
        build_objective(cfg, teacher, generator_net, fake_net, device, bare_fake_net),
        fake_score=fake_net,
        draw=conditions.draw,
        update_generator=update_generator,
        update_fake=update_fake,
        rng=rng,
        dm_batch=dm_batch,
        fake_updates=cfg.fake_updates,
        draw_real=draw_real,
    )
