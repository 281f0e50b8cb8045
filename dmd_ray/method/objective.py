"""One DMD iteration, framework-free (DMD Alg. 1): the objective's two losses, and the step that applies them.

Each iteration makes one generator update on

    loss_G = dm_weight * loss_DM(G(z), c) + lambda_reg * loss_reg(G(z_ref), y_ref) + gan_weight * loss_GAN_G(G(z), c)

and then `fake_updates` fake-score updates (DMD: 1; DMD2's TTUR: 5-10) on the denoising loss of detached G(z')
(plus, with DMD2's GAN, gan_discriminator_weight * loss_GAN_D of G(z') against real samples).
`DMDObjective` says what to differentiate and guarantees that each loss touches one trainable network only;
`DMDStep` runs one iteration with update functions supplied by the caller (a torch optimiser in the 2D toy and the
plain-torch benchmark, a DeepSpeed engine in the Ray Train worker): the same loop body everywhere.

Losses come back as detached tensors, not Python floats: reading them forces a host-device synchronisation, so the
caller decides when (every `log_every` steps).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Callable

import torch
from torch import Tensor

from dmd_ray.method.denoiser import Denoiser, concat_conditions
from dmd_ray.method.gan import GANLoss
from dmd_ray.method.generator import MultiStepGenerator, OneStepGenerator
from dmd_ray.method.losses import DenoisingLoss, DistributionMatchingLoss, RegressionLoss


@dataclass
class DMDObjective:
    generator: OneStepGenerator | MultiStepGenerator
    dm_loss: DistributionMatchingLoss
    fake_loss: DenoisingLoss
    regression: RegressionLoss | None = None
    lambda_reg: float = 0.25
    dm_weight: float = 1.0  # 0 gives the "without distribution matching" ablation (regression only)
    gan: GANLoss | None = None  # DMD2's GAN term (its classifier head trains with the fake score)
    gan_weight: float = 3e-3  # the generator's GAN weight (DMD2: 3e-3 on ImageNet, 1e-3 for SD 1.5)
    gan_discriminator_weight: float = 1e-2  # the classifier's loss weight in the fake-score update (DMD2: always 1e-2)

    def __post_init__(self):
        if self.dm_weight == 0 and not self.uses_regression and self.gan is None:
            raise ValueError("with dm_weight = 0, no regression loss and no GAN the generator has nothing to learn from")
        if self.uses_regression and isinstance(self.generator, MultiStepGenerator):
            raise ValueError("the regression loss maps pure noise to the teacher's output in one step: a multi-step generator trains without it (lambda_reg = 0)")

    @property
    def needs_fake_score(self) -> bool:
        return self.dm_weight != 0 or self.gan is not None

    @property
    def uses_regression(self) -> bool:
        return self.regression is not None and self.lambda_reg != 0

    def generator_loss(
        self,
        noise: Tensor,
        cond: Any = None,
        pair_noise: Tensor | None = None,
        pair_cond: Any = None,
        pair_target: Tensor | None = None,
        generator: torch.Generator | None = None,
    ) -> tuple[Tensor, dict[str, Tensor]]:
        """The generator's loss on fresh noise (DM) and on stored teacher pairs (regression).

        Both batches go through the generator in one forward (DMD Alg. 1 concatenates them too), so a sharded
        generator gathers its weights once per step.
        """
        use_fresh, use_reg = self.needs_fake_score, self.uses_regression  # fresh noise feeds DM and the GAN
        if use_reg and (pair_noise is None or pair_target is None):
            raise ValueError("the regression loss needs a batch of (noise, target) pairs")
        inputs = ([(noise, cond)] if use_fresh else []) + ([(pair_noise, pair_cond)] if use_reg else [])
        out = self.generator.train_sample(torch.cat([z for z, _ in inputs]), concat_conditions([c for _, c in inputs]), generator)
        total = torch.zeros((), device=out.device)
        logs: dict[str, Tensor] = {}
        if self.dm_weight != 0:
            loss_dm = self.dm_loss(out[: noise.shape[0]], cond, generator=generator)
            total = total + self.dm_weight * loss_dm
            logs["loss_dm"] = loss_dm.detach()
        if self.gan is not None:
            loss_gan = self.gan.generator_loss(out[: noise.shape[0]], cond, generator=generator)
            total = total + self.gan_weight * loss_gan
            logs["loss_gan_generator"] = loss_gan.detach()
        if use_reg:
            loss_reg = self.regression(out[out.shape[0] - pair_noise.shape[0] :], pair_target)
            total = total + self.lambda_reg * loss_reg
            logs["loss_reg"] = loss_reg.detach()
        logs["loss_generator"] = total.detach()
        return total, logs

    def fake_score_loss(
        self, fake_net: Denoiser, noise: Tensor, cond: Any = None, generator: torch.Generator | None = None,
        real: Tensor | None = None, real_cond: Any = None,
    ) -> tuple[Tensor, dict[str, Tensor]]:
        """The fake score's denoising loss on generator samples (G runs without gradients); with the GAN, plus the
        classifier's loss on those samples against `real` ones."""
        with torch.no_grad():
            samples = self.generator.train_sample(noise, cond, generator)
        loss = self.fake_loss(fake_net, samples, cond, generator=generator)
        logs = {"loss_fake": loss.detach()}
        if self.gan is not None:
            if real is None:
                raise ValueError("the GAN's classifier needs a batch of real samples")
            loss_d = self.gan.discriminator_loss(samples, cond, real, real_cond, generator=generator)
            loss = loss + self.gan_discriminator_weight * loss_d
            logs["loss_gan_discriminator"] = loss_d.detach()
        return loss, logs


Update = Callable[[Tensor], Any]  # backpropagates a loss, steps the optimiser, returns the gradient norm (or None)


@dataclass
class DMDStep:
    """One DMD iteration per call: a generator update on fresh inputs (DM) plus a batch of stored pairs (regression),
    then `fake_updates` fake-score updates on fresh detached samples.

    `draw(n, rng)` returns n fresh generator inputs (noise, condition): random prompts for text-to-image, nothing for
    unconditional data. With the GAN term, `draw_real(n, rng)` returns n real samples (latents, condition) for the
    classifier; without it the classifier's real samples are the pairs' targets. All randomness (inputs, DM
    timesteps and noise, real samples) comes from `rng`, so a run replays exactly from a saved RNG state.
    """

    objective: DMDObjective
    fake_score: Denoiser  # the trainable network behind the fake loss (a module, or an engine wrapping one)
    draw: Callable[[int, torch.Generator], tuple[Tensor, Any]]
    update_generator: Update
    update_fake: Update
    rng: torch.Generator
    dm_batch: int
    fake_updates: int = 1
    draw_real: Callable[[int, torch.Generator], tuple[Tensor, Any]] | None = None

    def __call__(self, pair_noise: Tensor | None = None, pair_cond: Any = None, pair_target: Tensor | None = None) -> dict[str, Tensor]:
        noise, cond = self.draw(self.dm_batch, self.rng)
        loss, logs = self.objective.generator_loss(noise, cond, pair_noise, pair_cond, pair_target, generator=self.rng)
        _log_norm(logs, "grad_norm_generator", self.update_generator(loss))
        for _ in range(self.fake_updates if self.objective.needs_fake_score else 0):
            noise, cond = self.draw(self.dm_batch, self.rng)
            real, real_cond = pair_target, pair_cond
            if self.draw_real is not None and self.objective.gan is not None:
                real, real_cond = self.draw_real(self.dm_batch, self.rng)
            loss_fake, logs_fake = self.objective.fake_score_loss(self.fake_score, noise, cond, generator=self.rng, real=real, real_cond=real_cond)
            _log_norm(logs, "grad_norm_fake", self.update_fake(loss_fake))
            logs.update(logs_fake)
        return logs


def _log_norm(logs: dict, key: str, norm) -> None:
    if norm is not None:  # an optimiser that does not compute the norm returns None: nothing to log
        logs[key] = norm


def read_logs(logs: dict[str, Any]) -> dict[str, float]:
    """Logged tensors (and numbers) as Python floats: where the host waits for the device."""
    return {k: float(v) for k, v in logs.items()}


class LogWindow:
    """Each logged value's mean over the steps since the last `read`, summed on the device: one small kernel per step
    and no host wait. A NaN or infinity in any step makes its key's sum non-finite, so `finite()` at a log step checks
    the whole window. Host numbers (DeepSpeed reports a skipped step's gradient norm as a Python float) and keys that
    appear in some steps only are averaged over the steps that logged them."""

    def __init__(self) -> None:
        self.sums: dict[str, Any] = {}
        self.counts: dict[str, int] = {}

    def add(self, logs: dict[str, Any]) -> None:
        tensors = [k for k, v in logs.items() if isinstance(v, Tensor)]
        for k in tensors:
            if k not in self.sums:
                self.sums[k] = torch.zeros((), dtype=torch.float32, device=logs[k].device)
        if tensors:  # one multi-tensor kernel for the lot
            torch._foreach_add_([self.sums[k] for k in tensors], [logs[k].detach().float().reshape(()) for k in tensors])
        for k, v in logs.items():
            if not isinstance(v, Tensor):
                self.sums[k] = self.sums.get(k, 0.0) + float(v)
            self.counts[k] = self.counts.get(k, 0) + 1

    def finite(self, device: torch.device) -> Tensor:
        """Whether every value of the window was finite, as a tensor on `device` (no host wait)."""
        tensors = [v for v in self.sums.values() if isinstance(v, Tensor)]
        numbers_finite = all(math.isfinite(v) for v in self.sums.values() if not isinstance(v, Tensor))
        result = torch.tensor(numbers_finite, device=device)
        return result & torch.isfinite(torch.stack(tensors)).all() if tensors else result

    def read(self) -> dict[str, float]:
        """The window's means as Python floats (the host waits for the device here), and a new window."""
        sums = dict(self.sums)
        on_device = [k for k, v in sums.items() if isinstance(v, Tensor)]
        if on_device:  # one transfer for the lot
            sums.update(zip(on_device, torch.stack([sums[k] for k in on_device]).tolist()))
        means = {k: v / self.counts[k] for k, v in sums.items()}
        self.sums, self.counts = {}, {}
        return means
