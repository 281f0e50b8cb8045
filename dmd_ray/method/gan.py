"""DMD2's GAN term (Yin et al. 2024b, Sec. 4.3): a classifier on the fake score's features, diffusion-GAN style.

Real and generated samples are both diffused to a random t before the classifier sees them (the fake score is a
denoiser: its features are defined on noisy inputs). The classifier is a small head on the fake score network's
features (DMD2: its bottleneck), trained with the fake score on the non-saturating loss

    loss_D = softplus(D(fake_t)) + softplus(-D(real_t))

and the generator adds gan_weight * softplus(-D(G(z)_t)) to its loss, with gradients flowing through the fake score
network to G's output but not into the fake score's weights (DMD2 turns their requires_grad off for that turn).
"""
from __future__ import annotations

from contextlib import contextmanager
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from dmd_ray.method.denoiser import concat_conditions
from dmd_ray.method.schedule import NoiseSchedule


class FeatureClassifier(nn.Module):
    """[B, C, H, W] features of the fake score network -> [B] logits. `features` names the level it reads, which the
    network that holds it computes (sd/teacher.py: "bottleneck", DMD2's choice, or "decoder"). DMD2's head is a
    stack of stride-2 4x4 convolutions down to 4x4 (an 8x8 SD bottleneck); this one pools after two convolutions, so
    it fits any feature size (the demo teacher's bottleneck is 2x2, its decoder's output 8x8)."""

    def __init__(self, channels: int, features: str = "bottleneck", hidden: int = 0, groups: int = 8):
        super().__init__()
        hidden = hidden or channels
        self.features = features
        self.body = nn.Sequential(
            nn.Conv2d(channels, hidden, 3, padding=1), nn.GroupNorm(min(groups, hidden), hidden), nn.SiLU(),
            nn.Conv2d(hidden, hidden, 3, padding=1), nn.GroupNorm(min(groups, hidden), hidden), nn.SiLU(),
        )
        self.out = nn.Linear(hidden, 1)

    def forward(self, features: Tensor) -> Tensor:
        dtype = self.out.weight.dtype  # fp32 (autocast decides), or bf16 weights under DeepSpeed's ZeRO 1-3 bf16 mode
        return self.out(self.body(features.to(dtype)).mean(dim=(2, 3))).squeeze(1)


@contextmanager
def frozen(module: nn.Module):
    """The module's parameters get no gradients inside (gradients still flow through it to its inputs); their
    requires_grad flags are restored afterwards."""
    flags = [(p, p.requires_grad) for p in module.parameters()]
    for p, _ in flags:
        p.requires_grad_(False)
    try:
        yield
    finally:
        for p, flag in flags:
            p.requires_grad_(flag)


class GANLoss:
    """Both sides of the non-saturating diffusion-GAN loss. `network` is the fake score network, which also
    classifies: network(x_t, t, cond, classify=True) -> [B] logits from its features. `frozen_network`, when
    given, is the same network for the generator's side, where gradients pass through it to the samples: the bare
    module when `network` is wrapped by a trainer (a DeepSpeed engine claims every backward through its forward)."""

    def __init__(self, network: nn.Module, schedule: NoiseSchedule, t_range: tuple[float, float] = (0.0, 1.0),
                 frozen_network: nn.Module | None = None):
        self.network = network
        self.frozen_network = network if frozen_network is None else frozen_network
        self.schedule = schedule
        self.t_range = t_range

    @staticmethod
    def classify(network: nn.Module, x_t: Tensor, t: Tensor, cond: Any) -> Tensor:
        return network(x_t, t, cond, classify=True).float()

    def _diffuse(self, x: Tensor, generator: torch.Generator | None) -> tuple[Tensor, Tensor]:
        x_t, t, _ = self.schedule.diffuse(x, self.t_range, generator)
        return x_t, t

    def generator_loss(self, fake: Tensor, cond: Any = None, generator: torch.Generator | None = None) -> Tensor:
        x_t, t = self._diffuse(fake, generator)
        with frozen(self.frozen_network):
            return F.softplus(-self.classify(self.frozen_network, x_t, t, cond)).mean()

    def discriminator_loss(self, fake: Tensor, fake_cond: Any, real: Tensor, real_cond: Any, generator: torch.Generator | None = None) -> Tensor:
        fake_t, t_fake = self._diffuse(fake.detach(), generator)
        real_t, t_real = self._diffuse(real.detach().to(fake.dtype), generator)
        # One pass over both batches: half the kernel launches of two (the step is host-bound on small models), and
        # the same logits, since nothing in the UNet's encoder or the head mixes samples (group norms are per sample).
        logits = self.classify(self.network, torch.cat([fake_t, real_t]), torch.cat([t_fake, t_real]), concat_conditions([fake_cond, real_cond]))
        fake_logits, real_logits = logits.split([fake.shape[0], real.shape[0]])
        return F.softplus(fake_logits).mean() + F.softplus(-real_logits).mean()
