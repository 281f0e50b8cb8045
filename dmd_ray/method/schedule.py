"""Discrete diffusion noise schedules: x_t = alpha_t * x0 + sigma_t * eps, with t in {0, ..., T-1}.

This is the variance-preserving family that diffusers' DDPM/DDIM/PNDM schedulers use (alpha_t^2 + sigma_t^2 = 1,
alpha_t^2 = alphas_cumprod[t]). Conversions between prediction types run in float64: at t = 999 of Stable
Diffusion's schedule alpha_t is 0.068, so reading x0 out of an epsilon prediction amplifies rounding by 15x.
"""
from __future__ import annotations

import math

import torch
from torch import Tensor

from dmd_ray.method.transfer import to_device

PREDICTION_TYPES = ("epsilon", "v_prediction", "sample")


def check_prediction_type(prediction_type: str) -> None:
    if prediction_type not in PREDICTION_TYPES:
        raise ValueError(f"unknown prediction_type {prediction_type!r}; expected one of {PREDICTION_TYPES}")


class NoiseSchedule:
    """The alphas/sigmas of a discrete variance-preserving schedule, and the maths on them."""

    def __init__(self, alphas_cumprod: Tensor):
        alphas_cumprod = torch.as_tensor(alphas_cumprod, dtype=torch.float64).flatten().cpu()
        if alphas_cumprod.numel() < 2 or not ((alphas_cumprod > 0) & (alphas_cumprod <= 1)).all():
            raise ValueError("alphas_cumprod must hold at least two values in (0, 1]")
        if not (alphas_cumprod[1:] <= alphas_cumprod[:-1]).all():
            raise ValueError("alphas_cumprod must be non-increasing in t")
        self.alphas_cumprod = alphas_cumprod
        self._tables: dict[torch.device, tuple[Tensor, Tensor]] = {}

    # ----------------------------------------------------------------------------------------- construction
    @classmethod
    def from_betas(
        cls,
        beta_schedule: str = "scaled_linear",
        beta_start: float = 0.00085,
        beta_end: float = 0.012,
        num_train_timesteps: int = 1000,
    ) -> "NoiseSchedule":
        """The beta schedules of diffusers' DDPMScheduler (defaults: Stable Diffusion 1.x/2.x)."""
        t = num_train_timesteps
        if beta_schedule == "linear":
            betas = torch.linspace(beta_start, beta_end, t, dtype=torch.float64)
        elif beta_schedule == "scaled_linear":
            betas = torch.linspace(beta_start**0.5, beta_end**0.5, t, dtype=torch.float64) ** 2
        elif beta_schedule == "squaredcos_cap_v2":
            f = lambda s: math.cos((s + 0.008) / 1.008 * math.pi / 2) ** 2  # noqa: E731
            betas = torch.tensor([min(1 - f((i + 1) / t) / f(i / t), 0.999) for i in range(t)], dtype=torch.float64)
        else:
            raise ValueError(f"unknown beta_schedule {beta_schedule!r}; expected linear, scaled_linear or squaredcos_cap_v2")
        return cls(torch.cumprod(1.0 - betas, dim=0))

    @classmethod
    def from_scheduler(cls, scheduler) -> "NoiseSchedule":
        """Reads the schedule of any diffusers scheduler that exposes `alphas_cumprod` (DDPM, DDIM, PNDM, ...).

        Recomputed in float64 from the scheduler's config where possible: diffusers keeps alphas_cumprod in float32.
        """
        cfg = getattr(scheduler, "config", {})
        if cfg.get("trained_betas") is None and cfg.get("beta_schedule") in ("linear", "scaled_linear", "squaredcos_cap_v2"):
            if not cfg.get("rescale_betas_zero_snr", False):
                return cls.from_betas(cfg["beta_schedule"], cfg["beta_start"], cfg["beta_end"], cfg["num_train_timesteps"])
        if not hasattr(scheduler, "alphas_cumprod"):
            raise TypeError(f"{type(scheduler).__name__} has no alphas_cumprod: not a discrete VP scheduler")
        return cls(scheduler.alphas_cumprod)

    # ----------------------------------------------------------------------------------------- lookups
    @property
    def num_timesteps(self) -> int:
        return self.alphas_cumprod.numel()

    def _table(self, device: torch.device) -> tuple[Tensor, Tensor]:
        if device not in self._tables:
            a = self.alphas_cumprod.to(device)
            self._tables[device] = (a.sqrt(), (1.0 - a).sqrt())
        return self._tables[device]

    def alpha_sigma(self, t: Tensor, ndim: int) -> tuple[Tensor, Tensor]:
        """float64 (alpha_t, sigma_t) for integer timesteps `t` of shape [B], shaped [B, 1, ...] to `ndim` dims."""
        t = torch.as_tensor(t)
        if t.device.type == "cpu":  # checked where it is free: on a GPU each check would make the host wait
            if t.is_floating_point() and not torch.equal(t, t.round()):
                raise ValueError("timesteps of a discrete schedule must be integers")
            if t.numel() and (int(t.min()) < 0 or int(t.max()) >= self.num_timesteps):
                raise ValueError(f"timesteps must lie in [0, {self.num_timesteps - 1}]")
        alpha, sigma = self._table(t.device)
        shape = (-1,) + (1,) * (ndim - 1)
        return alpha[t.long()].reshape(shape), sigma[t.long()].reshape(shape)

    def sample_timesteps(
        self,
        batch_size: int,
        t_range: tuple[float, float] = (0.0, 1.0),
        device: torch.device | str = "cpu",
        generator: torch.Generator | None = None,
    ) -> Tensor:
        """Uniform integer timesteps in [floor(lo * T), floor(hi * T)], clipped to [0, T-1]; both ends included.

        (0.02, 0.98) gives [20, 980] for T = 1000, the DM-loss range of DMD and DMD2.
        """
        lo_frac, hi_frac = t_range
        if not 0.0 <= lo_frac <= hi_frac <= 1.0:
            raise ValueError(f"t_range must satisfy 0 <= lo <= hi <= 1, got {t_range}")
        lo = int(lo_frac * self.num_timesteps)
        hi = min(int(hi_frac * self.num_timesteps), self.num_timesteps - 1)
        lo = min(lo, hi)
        gen_device = generator.device if generator is not None else device
        t = torch.randint(lo, hi + 1, (batch_size,), generator=generator, device=gen_device)
        return to_device(t, device)

    # ----------------------------------------------------------------------------------------- maths
    def diffuse(self, x0: Tensor, t_range: tuple[float, float] = (0.0, 1.0), generator: torch.Generator | None = None) -> tuple[Tensor, Tensor, Tensor]:
        """x0 noised to random timesteps in `t_range`: (x_t, t, noise). Both are drawn from `generator`, timesteps
        first, on the generator's device (a CPU generator, whose state a checkpoint keeps, on GPU runs) and moved to
        x0's without a host synchronisation."""
        t = self.sample_timesteps(x0.shape[0], t_range, x0.device, generator)
        noise = torch.randn(x0.shape, generator=generator, device=x0.device if generator is None else generator.device)
        noise = to_device(noise, x0.device, x0.dtype)
        return self.add_noise(x0, noise, t), t, noise

    def add_noise(self, x0: Tensor, noise: Tensor, t: Tensor) -> Tensor:
        alpha, sigma = self.alpha_sigma(t, x0.ndim)
        return (alpha * x0.double() + sigma * noise.double()).to(x0.dtype)

    def to_x0(self, prediction: Tensor, x_t: Tensor, t: Tensor, prediction_type: str) -> Tensor:
        """x0 read out of a network prediction; differentiable; float32 or wider."""
        check_prediction_type(prediction_type)
        out_dtype = torch.promote_types(prediction.dtype, torch.float32)
        alpha, sigma = self.alpha_sigma(t, x_t.ndim)
        pred, x_t = prediction.double(), x_t.double()
        if prediction_type == "epsilon":
            x0 = (x_t - sigma * pred) / alpha
        elif prediction_type == "v_prediction":
            x0 = alpha * x_t - sigma * pred
        else:
            x0 = pred
        return x0.to(out_dtype)

    def to_epsilon(self, prediction: Tensor, x_t: Tensor, t: Tensor, prediction_type: str) -> Tensor:
        """epsilon read out of a network prediction (a deliberate near-copy of to_x0: the same three prediction
        types, solved for the other unknown)."""
        check_prediction_type(prediction_type)
        out_dtype = torch.promote_types(prediction.dtype, torch.float32)
        alpha, sigma = self.alpha_sigma(t, x_t.ndim)
        pred, x_t = prediction.double(), x_t.double()
        if prediction_type == "epsilon":
            eps = pred
        elif prediction_type == "v_prediction":
            eps = sigma * x_t + alpha * pred
        else:
            eps = (x_t - alpha * pred) / sigma
        return eps.to(out_dtype)

    def training_target(self, x0: Tensor, noise: Tensor, t: Tensor, prediction_type: str) -> Tensor:
        """What a network of this prediction type is trained to output at x_t = add_noise(x0, noise, t).

        The same targets as diffusers' training scripts: noise, scheduler.get_velocity(x0, noise, t), or x0.
        """
        check_prediction_type(prediction_type)
        if prediction_type == "epsilon":
            return noise
        if prediction_type == "sample":
            return x0
        alpha, sigma = self.alpha_sigma(t, x0.ndim)
        return (alpha * noise.double() - sigma * x0.double()).to(x0.dtype)
