"""One DMD iteration's losses, framework-free (DMD Alg. 1).

Each iteration makes one generator update on

    loss_G = dm_weight * loss_DM(G(z), c) + lambda_reg * loss_reg(G(z_ref), y_ref)

and then `fake_updates` fake-score updates (DMD: 1; DMD2's TTUR: 5-10) on the denoising loss of detached G(z').
Who applies the updates (a torch optimizer, a DeepSpeed engine) is the caller's business: this module only says
what to differentiate, and guarantees that each loss touches one trainable network only.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from dmd_ray.denoiser import Denoiser
from dmd_ray.generator import OneStepGenerator
from dmd_ray.losses import DenoisingLoss, DistributionMatchingLoss, RegressionLoss


def _concat(conds: list[Any]) -> Any:
    if conds[0] is None:
        return None
    if len(conds) == 1:
        return conds[0]
    return torch.cat(conds)


@dataclass
class DMDObjective:
    generator: OneStepGenerator
    dm_loss: DistributionMatchingLoss
    fake_loss: DenoisingLoss
    regression: RegressionLoss | None = None
    lambda_reg: float = 0.25
    dm_weight: float = 1.0  # 0 gives the "without distribution matching" ablation (regression only)

    def __post_init__(self):
        if self.dm_weight == 0 and (self.regression is None or self.lambda_reg == 0):
            raise ValueError("with dm_weight = 0 and no regression loss the generator has nothing to learn from")

    @property
    def needs_fake_score(self) -> bool:
        return self.dm_weight != 0

    def generator_loss(
        self,
        noise: Tensor,
        cond: Any = None,
        pair_noise: Tensor | None = None,
        pair_cond: Any = None,
        pair_target: Tensor | None = None,
        generator: torch.Generator | None = None,
    ) -> tuple[Tensor, dict[str, float]]:
        """The generator's loss on fresh noise (DM) and on stored teacher pairs (regression).

        Both batches go through the generator in one forward (DMD Alg. 1 concatenates them too), so a sharded
        generator gathers its weights once per step.
        """
        use_dm = self.dm_weight != 0
        use_reg = self.regression is not None and self.lambda_reg != 0
        if use_reg and (pair_noise is None or pair_target is None):
            raise ValueError("the regression loss needs a batch of (noise, target) pairs")
        inputs = ([(noise, cond)] if use_dm else []) + ([(pair_noise, pair_cond)] if use_reg else [])
        out = self.generator(torch.cat([z for z, _ in inputs]), _concat([c for _, c in inputs]))
        total = torch.zeros((), device=out.device)
        logs: dict[str, float] = {}
        if use_dm:
            x = out[: noise.shape[0]]
            loss_dm = self.dm_loss(x, cond, generator=generator)
            total = total + self.dm_weight * loss_dm
            logs["loss_dm"] = loss_dm.item()
        if use_reg:
            loss_reg = self.regression(out[out.shape[0] - pair_noise.shape[0] :], pair_target)
            total = total + self.lambda_reg * loss_reg
            logs["loss_reg"] = loss_reg.item()
        logs["loss_generator"] = total.item()
        return total, logs

    def fake_score_loss(
        self, fake_net: Denoiser, noise: Tensor, cond: Any = None, generator: torch.Generator | None = None
    ) -> tuple[Tensor, dict[str, float]]:
        """The fake score's denoising loss on generator samples; G runs without gradients."""
        with torch.no_grad():
            samples = self.generator(noise, cond)
        loss = self.fake_loss(fake_net, samples, cond, generator=generator)
        return loss, {"loss_fake": loss.item()}
