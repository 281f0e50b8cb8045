"""Host-to-device copies that do not make the host wait.

A plain `cpu_tensor.to("cuda")` copies from pageable memory and synchronises the stream: the host then waits for
every kernel queued before it. Random draws come from CPU generators (so a run replays exactly from a saved state,
on any device), so a step makes several such copies; pinned, non-blocking copies keep the host queueing ahead.
"""
from __future__ import annotations

import torch
from torch import Tensor


def to_device(x: Tensor, device: torch.device | str, dtype: torch.dtype | None = None) -> Tensor:
    """`x` on `device` (and in `dtype`); from the CPU to a GPU through pinned memory, without a host wait. The
    caching host allocator keeps the pinned block until the copy has run, so `x` may be dropped at once."""
    device = torch.device(device)
    if x.device.type == "cpu" and device.type == "cuda":
        x = x.pin_memory().to(device, non_blocking=True)
    return x.to(device=device, dtype=dtype)
