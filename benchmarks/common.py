"""What every benchmark that reports utilisation shares: the device's peak measured in the same run, model FLOPs
counted by torch, and a printed table.

    python benchmarks/common.py            # just the peak matmul rate of this machine

Utilisation is model FLOP/s over the rate of one large matrix product on the same device, timed in the same run
(`peak_matmul`): on a GPU an 8192x8192x8192 bf16 `torch.matmul` on random data (zeros run faster on some GPUs),
best of several timed runs after warm-up; on a CPU a 2048^3 fp32 product, labelled as such. No rate is copied
from a datasheet. Model FLOPs come from torch's FlopCounterMode (`count_flops`): matmuls, convolutions and
attention as torch counts them, forward and backward, nothing estimated by hand.
"""
from __future__ import annotations

import os
import platform
import time
from dataclasses import dataclass
from typing import Any, Callable, Sequence

import torch


def default_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def synchronize(device: torch.device | str) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def device_name(device: torch.device | str) -> str:
    if torch.device(device).type == "cuda":
        return torch.cuda.get_device_name(torch.device(device))
    return f"CPU ({os.cpu_count()} cores, {torch.get_num_threads()} torch threads, {platform.processor() or platform.machine()})"


@dataclass(frozen=True)
class Peak:
    """The measured rate of one large matmul on this device: the denominator of utilisation."""

    tflops: float
    dtype: torch.dtype
    n: int
    device: str

    @property
    def label(self) -> str:
        name = str(self.dtype).removeprefix("torch.")
        return f"{name} matmul {self.n}x{self.n}x{self.n} on {self.device}: {self.tflops:.3g} TFLOP/s (measured in this run, best of several)"

    def utilisation(self, tflops: float | None) -> str:
        if not tflops or not self.tflops:
            return "-"
        return f"{100 * tflops / self.tflops:.1f}%"


def peak_matmul(device: torch.device | str | None = None, dtype: torch.dtype | None = None, n: int | None = None,
                warmup: int = 3, runs: int = 5, per_run: int | None = None) -> Peak:
    """Times `torch.matmul` of two random n x n matrices on `device` and returns the best rate of `runs` timed runs
    (each `per_run` products, after `warmup` untimed ones). Defaults: bf16 at n = 8192 on a GPU; fp32 at n = 2048 on
    a CPU (bf16 matmuls on most CPUs are emulated, and the CPU rows are about overhead, not utilisation)."""
    device = torch.device(device) if device is not None else default_device()
    gpu = device.type == "cuda"
    dtype = dtype or (torch.bfloat16 if gpu else torch.float32)
    n = n or (8192 if gpu else 2048)
    per_run = per_run or (10 if gpu else 2)
    gen = torch.Generator(device=device).manual_seed(0)
    a = torch.randn(n, n, device=device, dtype=dtype, generator=gen)
    b = torch.randn(n, n, device=device, dtype=dtype, generator=gen)
    out = torch.empty(n, n, device=device, dtype=dtype)
    for _ in range(warmup):
        torch.matmul(a, b, out=out)
    synchronize(device)
    best = float("inf")
    for _ in range(runs):
        started = time.perf_counter()
        for _ in range(per_run):
            torch.matmul(a, b, out=out)
        synchronize(device)
        best = min(best, (time.perf_counter() - started) / per_run)
    del a, b, out
    if gpu:
        torch.cuda.empty_cache()
    return Peak(tflops=2 * n**3 / best / 1e12, dtype=dtype, n=n, device=device_name(device))


def _cpu_attention_formulas() -> dict:
    """FlopCounterMode counts the GPU kernels of scaled_dot_product_attention but not the CPU one (torch 2.14):
    give the CPU kernel, forward and backward, the same formulas, so that CPU and GPU counts agree."""
    from torch.utils.flop_counter import sdpa_backward_flop_count, sdpa_flop_count

    aten = torch.ops.aten
    formulas = {}
    if hasattr(aten, "_scaled_dot_product_flash_attention_for_cpu"):
        formulas[aten._scaled_dot_product_flash_attention_for_cpu] = (
            lambda query, key, value, *args, out_shape=None, **kwargs: sdpa_flop_count(query, key, value))
    if hasattr(aten, "_scaled_dot_product_flash_attention_for_cpu_backward"):
        formulas[aten._scaled_dot_product_flash_attention_for_cpu_backward] = (
            lambda grad_out, query, key, value, *args, out_shape=None, **kwargs: sdpa_backward_flop_count(grad_out, query, key, value))
    return formulas


def count_flops(fn: Callable[..., Any], *args, **kwargs) -> tuple[Any, int]:
    """Runs `fn(*args, **kwargs)` under torch's FlopCounterMode: (its result, the FLOPs of every op it ran,
    including the backward passes it ran). Matmuls, convolutions and attention; elementwise ops count 0."""
    from torch.utils.flop_counter import FlopCounterMode

    counter = FlopCounterMode(display=False, custom_mapping=_cpu_attention_formulas())
    with counter:
        result = fn(*args, **kwargs)
    return result, int(counter.get_total_flops())


def print_table(headers: Sequence[str], rows: Sequence[Sequence[Any]], title: str = "") -> None:
    """A Markdown table (pastes into BENCHMARKS.md as it is)."""
    cells = [[str(h) for h in headers]] + [[str(c) for c in row] for row in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(headers))]
    if title:
        print(f"\n{title}")
    print("| " + " | ".join(h.ljust(w) for h, w in zip(cells[0], widths)) + " |")
    print("|" + "|".join("-" * (w + 2) for w in widths) + "|")
    for row in cells[1:]:
        print("| " + " | ".join(c.ljust(w) for c, w in zip(row, widths)) + " |")


if __name__ == "__main__":
    print(peak_matmul().label)
