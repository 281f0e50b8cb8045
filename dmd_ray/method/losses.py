"""The three losses of DMD, each a small class: hyper-parameters in __init__, the maths in __call__.

All of them work on denoiser callables (x_t, t, cond) -> prediction, whatever network sits behind.
"""
from __future__ import annotations

from typing import Any, Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from dmd_ray.method.denoiser import Denoiser
from dmd_ray.method.schedule import NoiseSchedule, check_prediction_type


def _per_sample_mean(x: Tensor) -> Tensor:
    return x.flatten(1).mean(dim=1).reshape((-1,) + (1,) * (x.ndim - 1))


class DistributionMatchingLoss:
    """The generator's distribution-matching loss (DMD Eq. 7-8, Alg. 2).

    Diffuse the generator's sample x to a random t in `t_range` (fractions of T; DMD: [0.02, 0.98]) and compare the
    x0 predictions of the guided real score (the frozen teacher) and of the fake score (trained on G's samples):

        grad = (p_real - p_fake) / mean_CHW |p_real|,   p = x - mu(x_t, t)
        loss = 0.5 * mse(x, stopgrad(x - grad))

    so d loss / d x = grad / N (N elements in the batch). The normaliser keeps the update's size comparable across
    noise levels. Both score networks run without gradients: nothing flows into the fake score from this loss.
    """

    def __init__(self, real_x0: Denoiser, fake_x0: Denoiser, schedule: NoiseSchedule, t_range: tuple[float, float] = (0.02, 0.98)):
        self.real_x0 = real_x0
        self.fake_x0 = fake_x0
        self.schedule = schedule
        self.t_range = t_range

    def __call__(self, x: Tensor, cond: Any = None, generator: torch.Generator | None = None) -> Tensor:
        with torch.no_grad():
            x_t, t, _ = self.schedule.diffuse(x.detach(), self.t_range, generator)
            x_ref = x.detach().float()
            p_real = x_ref - self.real_x0(x_t, t, cond).float()
            p_fake = x_ref - self.fake_x0(x_t, t, cond).float()
            grad = torch.nan_to_num((p_real - p_fake) / _per_sample_mean(p_real.abs()))
        return 0.5 * F.mse_loss(x.float(), (x_ref - grad).detach())


class DenoisingLoss:
    """A diffusion model's own training loss: MSE to the target of its prediction type, t uniform in `t_range`.

    This is what the fake score minimises on detached generator samples (DMD Eq. 6: "the same weighting as the
    base model"; for an epsilon model that is plain epsilon-MSE), and what trains a teacher from scratch.
    """

    def __init__(self, schedule: NoiseSchedule, prediction_type: str = "epsilon", t_range: tuple[float, float] = (0.0, 1.0)):
        check_prediction_type(prediction_type)
        self.schedule = schedule
        self.prediction_type = prediction_type
        self.t_range = t_range

    def __call__(self, denoiser: Denoiser, x0: Tensor, cond: Any = None, generator: torch.Generator | None = None) -> Tensor:
        x0 = x0.detach()
        x_t, t, noise = self.schedule.diffuse(x0, self.t_range, generator)
        target = self.schedule.training_target(x0, noise, t, self.prediction_type)
        return F.mse_loss(denoiser(x_t, t, cond).float(), target.float())


class LPIPSDistance(nn.Module):
    """LPIPS between images in [-1, 1], per sample (DMD's regression distance).

    `pretrained_backbone=False` keeps the calibrated linear heads shipped with the `lpips` package but uses a
    randomly initialised backbone: for machines that cannot download the ImageNet VGG/AlexNet weights. That backbone
    is drawn from `seed`, so that the distance is the same function in every process (drawn from the process's RNG, the
    evaluation's LPIPS diversity of the same images differed by up to 20% between two runs). Images smaller than
    `min_size` are upsampled bilinearly first, as DMD does for CIFAR and ImageNet (to 224).
    """

    def __init__(self, backbone: str = "vgg", pretrained_backbone: bool = True, min_size: int = 224, seed: int = 0):
        super().__init__()
        import lpips  # heavy import (torchvision models); only where LPIPS is used

        with torch.random.fork_rng(devices=[]):  # the caller's RNG stream is left as it was
            torch.manual_seed(seed)
            self.lpips = lpips.LPIPS(net=backbone, pretrained=True, pnet_rand=not pretrained_backbone, verbose=False)
        self.lpips.requires_grad_(False).eval()
        self.min_size = min_size

    def forward(self, a: Tensor, b: Tensor) -> Tensor:
        if a.shape[-1] < self.min_size or a.shape[-2] < self.min_size:
            size = (max(a.shape[-2], self.min_size), max(a.shape[-1], self.min_size))
            a = F.interpolate(a, size=size, mode="bilinear", align_corners=False)
            b = F.interpolate(b, size=size, mode="bilinear", align_corners=False)
        return self.lpips(a.float(), b.float()).flatten()


def squared_l2(a: Tensor, b: Tensor) -> Tensor:
    """Per-sample mean squared error."""
    return (a.float() - b.float()).pow(2).flatten(1).mean(dim=1)


class RegressionLoss:
    """The regression loss on (noise, teacher ODE output) pairs: mean_i distance(G(z_i), y_i) (DMD Sec. 3.3).

    `distance` maps two batches to per-sample distances: `LPIPSDistance()` for images, `squared_l2` for other data.
    `decode` maps both sides to the space the distance lives in (a VAE decoder for latent models).
    """

    def __init__(self, distance: Callable[[Tensor, Tensor], Tensor] = squared_l2, decode: Callable[[Tensor], Tensor] | None = None):
        self.distance = distance
        self.decode = decode

    def __call__(self, generated: Tensor, target: Tensor) -> Tensor:
        target = target.detach().to(generated.device)
        if self.decode is not None:
            with torch.no_grad():
                target = self.decode(target)
            generated = self.decode(generated)
        return self.distance(generated, target).mean()
