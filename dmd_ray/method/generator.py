"""The generators: the teacher's network at one fixed timestep (or a few), its output read as x0.

DMD initialises G(z) = mu_base(z, T-1) (Yin et al. 2024, Sec. 3.1): the generator is a trainable copy of the
teacher evaluated on pure noise at t = 999 for SD 1.5. DMD2 conditions on t = 399 for one-step SDXL (the
"timestep shift"), still feeding pure noise; both are OneStepGenerator with a different `timestep`.

DMD2's multi-step generator (Sec. 4.4) applies the same network at a fixed decreasing list of timesteps (999, 749,
499, 249 for four steps), re-noising each x0 estimate to the next timestep with fresh noise, as consistency models
sample (`sampler="lcm"`, diffusers' LCMScheduler). With `sampler="ddim"` it re-noises with the noise the network read
in its input instead (its epsilon prediction: DDIM with eta = 0), so that the image is a deterministic function of the
starting noise. It is trained with backward simulation (Sec. 4.5): the input at step k is what the current generator
itself produces after k steps from pure noise, not a noised real image; that chain re-noises with fresh noise, as
DMD2's does, whichever sampler the generator samples with.

`train_sample(noise, cond, generator)` is what training differentiates: G(z) for one step; for several, a
backward-simulated input at a random step per sample and one differentiable forward there.
"""
from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from dmd_ray.method.schedule import NoiseSchedule, check_prediction_type
from dmd_ray.method.transfer import to_device


class OneStepGenerator(nn.Module):
    def __init__(self, net: nn.Module, schedule: NoiseSchedule, prediction_type: str = "epsilon", timestep: int | None = None):
        super().__init__()
        check_prediction_type(prediction_type)
        timestep = schedule.num_timesteps - 1 if timestep is None else int(timestep)
        if not 0 <= timestep < schedule.num_timesteps:
            raise ValueError(f"generator timestep {timestep} is outside [0, {schedule.num_timesteps - 1}]")
        self.net = net
        self.schedule = schedule
        self.prediction_type = prediction_type
        self.timestep = timestep

    def forward(self, noise: Tensor, cond: Any = None) -> Tensor:
        t = torch.full((noise.shape[0],), self.timestep, device=noise.device, dtype=torch.long)
        return self.schedule.to_x0(self.net(noise, t, cond), noise, t, self.prediction_type)

    def train_sample(self, noise: Tensor, cond: Any = None, generator: torch.Generator | None = None) -> Tensor:
        return self(noise, cond)


SAMPLERS = ("lcm", "ddim")


class MultiStepGenerator(nn.Module):
    def __init__(self, net: nn.Module, schedule: NoiseSchedule, prediction_type: str, timesteps: list[int], sampler: str = "lcm"):
        super().__init__()
        check_prediction_type(prediction_type)
        timesteps = [int(t) for t in timesteps]
        if not timesteps or any(not 0 <= t < schedule.num_timesteps for t in timesteps) or timesteps != sorted(set(timesteps), reverse=True):
            raise ValueError(f"generator timesteps must be distinct, decreasing and in [0, {schedule.num_timesteps - 1}], got {timesteps}")
        if sampler not in SAMPLERS:
            raise ValueError(f"multi-step sampler must be one of {', '.join(SAMPLERS)}, got {sampler!r}")
        self.net, self.schedule, self.prediction_type, self.timesteps, self.sampler = net, schedule, prediction_type, timesteps, sampler
        self.timestep = timesteps[0]

    def denoise(self, x_t: Tensor, t: Tensor, cond: Any = None) -> Tensor:
        return self.schedule.to_x0(self.net(x_t, t, cond), x_t, t, self.prediction_type)

    def _fresh_noise(self, like: Tensor, generator: torch.Generator | None) -> Tensor:
        noise = torch.randn(like.shape, generator=generator, device=like.device if generator is None else generator.device)
        return to_device(noise, like.device, like.dtype)

    def _step(self, x: Tensor, j: int, cond: Any, generator: torch.Generator | None, noise: Tensor | None = None,
              deterministic: bool = False) -> tuple[Tensor, Tensor | None]:
        """Step j of the chain from x: x0 at timesteps[j], and x0 re-noised to timesteps[j + 1] (None at the last),
        with `noise`, fresh noise, or (`deterministic`) the noise the network predicted in x."""
        t = self._full(self.timesteps[j], x)
        prediction = self.net(x, t, cond)
        x0 = self.schedule.to_x0(prediction, x, t, self.prediction_type)
        if j + 1 == len(self.timesteps):
            return x0, None
        if deterministic:
            noise = self.schedule.to_epsilon(prediction, x, t, self.prediction_type)
        noise = self._fresh_noise(x, generator) if noise is None else noise.to(x.device, x.dtype)
        return x0, self.schedule.add_noise(x0.to(x.dtype), noise, self._full(self.timesteps[j + 1], x))

    def forward(self, noise: Tensor, cond: Any = None, generator: torch.Generator | None = None, step_noise: list[Tensor] | None = None) -> Tensor:
        """Sampling: denoise at each timestep, re-noise to the next one, as the export's scheduler does in diffusers:
        "lcm" with the noises of `step_noise` (one per step after the first) or fresh ones, "ddim" with the network's
        own epsilon (`generator` and `step_noise` are then not used)."""
        if step_noise is not None and len(step_noise) != len(self.timesteps) - 1:
            raise ValueError(f"a {len(self.timesteps)}-step generator re-noises {len(self.timesteps) - 1} times, got {len(step_noise)} noises")
        renoise = [None] * len(self.timesteps) if step_noise is None else [*step_noise, None]  # None: fresh noise, or the last step
        x = noise
        for j, noise_j in enumerate(renoise):
            x0, x = self._step(x, j, cond, generator, noise_j, deterministic=self.sampler == "ddim")
        return x0

    def train_sample(self, noise: Tensor, cond: Any = None, generator: torch.Generator | None = None) -> Tensor:
        """Backward simulation: each sample gets a step k uniform in [0, steps); its input is the current generator's
        own chain after k steps from `noise` (no gradients), and its output the differentiable x0 at step k."""
        n = noise.shape[0]
        k = to_device(torch.randint(0, len(self.timesteps), (n,), generator=generator, device=generator.device if generator is not None else "cpu"), noise.device)
        x_in, x = noise, noise
        with torch.no_grad():
            for j in range(len(self.timesteps) - 1):  # x becomes the chain's input at step j + 1
                _, x = self._step(x, j, cond, generator)
                x_in = torch.where((k == j + 1).reshape((-1,) + (1,) * (noise.ndim - 1)), x, x_in)
        t = torch.as_tensor(self.timesteps, device=noise.device)[k]
        return self.denoise(x_in, t, cond)

    @staticmethod
    def _full(step: int, like: Tensor) -> Tensor:
        return torch.full((like.shape[0],), step, device=like.device, dtype=torch.long)
