"""Where an iteration's time goes: torch.profiler over a few steady steps, summarised per iteration as GPU time,
kernel launches (a CUDA graph's launch counts once) and the ops that take the most device and host time. GPU busy
is that GPU time over an unprofiled step's wall time (the profiler slows the host). The Ray Train worker profiles its
own steps with it (`profile_steps`), the benchmarks their loops."""
from __future__ import annotations

import time
from typing import Any, Callable

import torch

LAUNCH_CALLS = ("cudaLaunchKernel", "cudaLaunchKernelExC", "cuLaunchKernel", "cuLaunchKernelEx", "cudaGraphLaunch")


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _profiler(device: torch.device):
    from torch.profiler import ProfilerActivity, profile

    return profile(activities=[ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else []))


def summarize(prof, steps: int, wall_s: float | None = None) -> dict:
    """Per iteration: device time, launches, the top device and host ops (ms and calls), and the wall time under the
    profiler."""
    events = prof.key_averages()
    device_s = sum(e.self_device_time_total for e in events if e.device_type != torch.autograd.DeviceType.CPU) / 1e6

    def top(key: str, n: int) -> list:  # (op, ms per iteration, calls per iteration): the calls tell a per-step op from a one-off
        return [(e.key[:60], round(getattr(e, key) / 1e3 / steps, 2), round(e.count / steps, 1))
                for e in sorted(events, key=lambda e: -getattr(e, key))[:n]]

    out = {"launches_per_iteration": sum(e.count for e in events if e.key in LAUNCH_CALLS) / steps, "top_cpu_ms": top("self_cpu_time_total", 12)}
    if wall_s:
        out["wall_s_per_iteration"] = wall_s / steps
    if device_s:  # a CPU run has no device time
        out |= {"gpu_s_per_iteration": device_s / steps, "top_gpu_ms": top("self_device_time_total", 8)}
    return out


def profile_iterations(run: Callable[[int], Any], steps: int, device: torch.device) -> dict:
    """`run(steps)` under torch.profiler (CPU, and CUDA on a GPU), summarised."""
    synchronize(device)
    with _profiler(device) as prof:
        started = time.perf_counter()
        run(steps)
        synchronize(device)
        wall = time.perf_counter() - started
    return summarize(prof, steps, wall)


class StepProfiler:
    """Profiles the loop's steps [start, start + steps): `before(step)` at the top of the loop body, `after(step)`
    after the step; `after` returns the summary once the last profiled step is done (None otherwise)."""

    def __init__(self, start: int, steps: int, device: torch.device):
        self.start, self.steps, self.device = start, steps, device
        self._prof, self._started = None, 0.0

    def before(self, step: int) -> None:
        if step != self.start:
            return
        synchronize(self.device)
        self._prof = _profiler(self.device)
        self._prof.__enter__()
        self._started = time.perf_counter()

    def after(self, step: int) -> dict | None:
        if self._prof is None or step != self.start + self.steps - 1:
            return None
        synchronize(self.device)
        wall = time.perf_counter() - self._started
        self._prof.__exit__(None, None, None)
        summary, self._prof = summarize(self._prof, self.steps, wall), None
        return summary
