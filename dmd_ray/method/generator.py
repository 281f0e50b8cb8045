"""The one-step generator: the teacher's network at one fixed timestep, its output read as x0.

DMD initialises G(z) = mu_base(z, T-1) (Yin et al. 2024, Sec. 3.1): the generator is a trainable copy of the
teacher evaluated on pure noise at t = 999 for SD 1.5. DMD2 conditions on t = 399 for one-step SDXL (the
"timestep shift"), still feeding pure noise; both are this class with a different `timestep`.
"""
from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from dmd_ray.method.schedule import NoiseSchedule, check_prediction_type


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
