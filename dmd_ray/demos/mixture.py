"""2D Gaussian mixtures and exact distances to them, for the toy experiment.

The energy distance D^2(P, Q) = 2 E|X - Y| - E|X - X'| - E|Y - Y'| (Szekely & Rizzo) is zero iff P = Q. Against a
mixture of isotropic Gaussians two of its three terms have closed forms: |mu + s n| with n ~ N(0, I_2) is Rice
distributed, with mean s sqrt(pi/2) L_{1/2}(-|mu|^2 / 2s^2). Only E|X - X'| is estimated from samples (an unbiased
U-statistic), so the estimate's noise is far smaller than a two-sample estimate's.
"""
from __future__ import annotations

import json
import math
from dataclasses import dataclass

import torch
from torch import Tensor

# P(|n| <= 3) for n ~ N(0, I_2): the share of a mode's mass within 3 standard deviations of its mean.
MASS_WITHIN_3_STD = 1.0 - math.exp(-4.5)


@dataclass
class GaussianMixture:
    means: Tensor  # [K, 2]
    stds: Tensor  # [K]
    weights: Tensor  # [K], sums to 1

    @classmethod
    def ring(cls, num_modes: int = 8, radius: float = 2.0, std: float = 0.1) -> "GaussianMixture":
        angles = torch.arange(num_modes, dtype=torch.float64) * (2 * math.pi / num_modes)
        means = radius * torch.stack([angles.cos(), angles.sin()], dim=1)
        return cls.create(means.tolist(), std)

    @classmethod
    def create(cls, means, std, weights=None) -> "GaussianMixture":
        """Validates and normalises a mixture spec: means [[x, y], ...], std (one or one per mode), weights."""
        try:
            means_t = torch.as_tensor(means, dtype=torch.float64)
        except (TypeError, ValueError) as e:
            raise ValueError(f"means must be a list of [x, y] pairs: {e}") from None
        if means_t.ndim != 2 or means_t.shape[1] != 2 or means_t.shape[0] < 1:
            raise ValueError(f"means must be a non-empty list of [x, y] pairs, got shape {list(means_t.shape)}")
        k = means_t.shape[0]
        stds = torch.as_tensor(std, dtype=torch.float64).flatten()
        if stds.numel() == 1:
            stds = stds.expand(k).clone()
        if stds.numel() != k or not (stds > 0).all():
            raise ValueError(f"std must be one positive number or one per mode ({k}), got {std!r}")
        w = torch.full((k,), 1.0 / k, dtype=torch.float64) if weights is None else torch.as_tensor(weights, dtype=torch.float64).flatten()
        if w.numel() != k or not (w >= 0).all() or float(w.sum()) <= 0:
            raise ValueError(f"weights must be {k} non-negative numbers with a positive sum, got {weights!r}")
        if not torch.isfinite(means_t).all():
            raise ValueError("means must be finite")
        return cls(means_t, stds, w / w.sum())

    @classmethod
    def from_json(cls, text: str) -> "GaussianMixture":
        """Parses {"means": [[x, y], ...], "std": s, "weights": [...]} (weights optional; std scalar or per mode)."""
        try:
            spec = json.loads(text)
        except json.JSONDecodeError as e:
            raise ValueError(f"--target is not valid JSON: {e}") from None
        if not isinstance(spec, dict) or "means" not in spec or "std" not in spec:
            raise ValueError('--target must be a JSON object with "means" and "std" (and optionally "weights")')
        unknown = set(spec) - {"means", "std", "weights"}
        if unknown:
            raise ValueError(f"--target has unknown keys {sorted(unknown)}; allowed: means, std, weights")
        return cls.create(spec["means"], spec["std"], spec.get("weights"))

    def to_dict(self) -> dict:
        return {"means": self.means.tolist(), "std": self.stds.tolist(), "weights": self.weights.tolist()}

    @property
    def num_modes(self) -> int:
        return self.means.shape[0]

    def sample(self, n: int, generator: torch.Generator | None = None) -> Tensor:
        idx = torch.multinomial(self.weights, n, replacement=True, generator=generator)
        noise = torch.randn(n, 2, generator=generator, dtype=torch.float64)
        return self.means[idx] + self.stds[idx, None] * noise

    def mean_and_std(self) -> tuple[Tensor, Tensor]:
        """The mixture's mean and its overall (isotropic) standard deviation, for normalising data."""
        mean = (self.weights[:, None] * self.means).sum(0)
        second = (self.weights * ((self.means - mean).pow(2).sum(1) + 2 * self.stds**2)).sum()
        return mean, (second / 2).sqrt()


def _rice_mean(nu: Tensor, s: Tensor) -> Tensor:
    """E|mu + s n| for n ~ N(0, I_2), |mu| = nu: s sqrt(pi/2) L_{1/2}(-nu^2 / 2s^2), with scaled Bessel functions."""
    a = nu.pow(2) / (2 * s.pow(2))
    laguerre = (1 + a) * torch.special.i0e(a / 2) + a * torch.special.i1e(a / 2)
    return s * math.sqrt(math.pi / 2) * laguerre


def _mean_pairwise_distance(x: Tensor, chunk: int = 4096) -> Tensor:
    """Unbiased E|X - X'| over distinct pairs of rows of x."""
    n = x.shape[0]
    total = torch.zeros((), dtype=torch.float64)
    for i in range(0, n, chunk):
        total += torch.cdist(x[i : i + chunk], x).sum()
    return total / (n * (n - 1))


def energy_distance(samples: Tensor, mixture: GaussianMixture) -> float:
    """D^2 between the empirical distribution of `samples` [N, 2] and the mixture (exact mixture terms)."""
    x = samples.to(torch.float64)
    if x.ndim != 2 or x.shape[1] != 2 or x.shape[0] < 2:
        raise ValueError("samples must have shape [N >= 2, 2]")
    if not torch.isfinite(x).all():
        return float("inf")
    # E|X - Y|: per sample, the mixture-weighted Rice mean of the distance to each component
    cross = (_rice_mean(torch.cdist(x, mixture.means), mixture.stds[None, :]) * mixture.weights).sum(1).mean()
    # E|Y - Y'|: Y_j - Y'_k ~ N(mu_j - mu_k, (s_j^2 + s_k^2) I)
    pair_std = (mixture.stds[:, None] ** 2 + mixture.stds[None, :] ** 2).sqrt()
    within_mixture = (mixture.weights[:, None] * mixture.weights[None, :] * _rice_mean(torch.cdist(mixture.means, mixture.means), pair_std)).sum()
    return float(2 * cross - _mean_pairwise_distance(x) - within_mixture)


def mode_statistics(samples: Tensor, mixture: GaussianMixture, min_mass_fraction: float = 0.2) -> dict:
    """Mode coverage and per-mode mass.

    A sample belongs to the mode nearest to it in units of that mode's std, if it lies within 3 std of it. A mode
    is covered when it holds at least `min_mass_fraction` of the mass it should hold within 3 std. The per-mode
    mass error is |observed mass - expected mass| within 3 std.
    """
    x = samples.to(torch.float64)
    scaled = torch.cdist(x, mixture.means) / mixture.stds[None, :]
    nearest = scaled.argmin(1)
    inside = scaled.gather(1, nearest[:, None]).squeeze(1) <= 3.0
    counts = torch.bincount(nearest[inside], minlength=mixture.num_modes).to(torch.float64)
    mass = counts / x.shape[0]
    expected = mixture.weights * MASS_WITHIN_3_STD
    error = (mass - expected).abs()
    covered = mass >= min_mass_fraction * expected
    return {
        "modes_covered": int(covered.sum()),
        "modes_total": mixture.num_modes,
        "mode_mass": mass.tolist(),
        "mode_mass_expected": expected.tolist(),
        "mode_mass_error": error.tolist(),
        "mode_mass_error_max": float(error.max()),
        "off_mode_fraction": float(1.0 - inside.to(torch.float64).mean()),
    }
