"""What makes the teacher's UNet fast on a GPU: one CFG sampling step (UNet forward at 2x batch), per variant.

    python benchmarks/bench_unet.py --batch 16 [--compile]

SD 1.5 architecture, random weights, fp16, 64x64 latents (512x512 images). Prints ms per step, the implied
50-step pairs/s, and TFLOP/s against the 0.80 TFLOP per image-forward of the DESIGN notes.
"""
from __future__ import annotations

import argparse
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402

from dmd_ray.models import build_sd15_architecture  # noqa: E402

UNET_TFLOP_PER_IMAGE = 0.80


def time_step(fn, x, t, c, iters=20):
    for _ in range(3):
        fn(x, t, c)
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(iters):
        fn(x, t, c)
    torch.cuda.synchronize()
    return (time.perf_counter() - t0) / iters


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--batch", type=int, default=16, help="pairs per step (the UNet sees 2x: CFG)")
    p.add_argument("--compile", action="store_true")
    args = p.parse_args()
    torch.backends.cuda.matmul.allow_tf32 = True
    torch.backends.cudnn.benchmark = True
    teacher = build_sd15_architecture().to("cuda", torch.float16)
    unet = teacher.unet
    b = 2 * args.batch
    x = torch.randn(b, 4, 64, 64, device="cuda", dtype=torch.float16)
    t = torch.full((b,), 500, device="cuda")
    c = torch.randn(b, 77, 768, device="cuda", dtype=torch.float16)

    def call(x, t, c):
        with torch.inference_mode():
            return unet(x, t, encoder_hidden_states=c, return_dict=False)[0]

    rows = []

    def record(name, seconds):
        rows.append((name, seconds))
        print(f"{name:40}{seconds * 1e3:9.1f} ms{args.batch / (50 * seconds):9.2f} pairs/s{b * UNET_TFLOP_PER_IMAGE / seconds:8.0f} TFLOP/s", flush=True)

    print(f"{torch.cuda.get_device_name()}, torch {torch.__version__}, UNet batch {b} (CFG)")
    record("eager", time_step(call, x, t, c))
    unet.to(memory_format=torch.channels_last)
    record("eager, channels_last", time_step(call, x.contiguous(memory_format=torch.channels_last), t, c))
    unet.to(memory_format=torch.contiguous_format)
    unet.fuse_qkv_projections()
    record("eager, fused qkv", time_step(call, x, t, c))
    from torch.nn.attention import SDPBackend, sdpa_kernel

    for backend in (SDPBackend.CUDNN_ATTENTION, SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION):
        try:
            with sdpa_kernel(backend):
                record(f"eager, fused qkv, {backend.name.lower()}", time_step(call, x, t, c))
        except RuntimeError as e:
            print(f"{backend.name}: unavailable ({str(e).splitlines()[0][:80]})")
    if args.compile:
        compiled = torch.compile(unet, fullgraph=True)

        def call_c(x, t, c):
            with torch.inference_mode():
                return compiled(x, t, encoder_hidden_states=c, return_dict=False)[0]

        t0 = time.perf_counter()
        call_c(x, t, c)
        torch.cuda.synchronize()
        print(f"compile took {time.perf_counter() - t0:.0f} s", flush=True)
        record("compiled, fused qkv", time_step(call_c, x, t, c))
        with sdpa_kernel(SDPBackend.CUDNN_ATTENTION):
            try:
                call_c(x, t, c)
                record("compiled, fused qkv, cudnn attention", time_step(call_c, x, t, c))
            except Exception as e:  # noqa: BLE001
                print(f"compiled cudnn attention failed: {str(e).splitlines()[0][:100]}")
        unet.to(memory_format=torch.channels_last)
        xc = x.contiguous(memory_format=torch.channels_last)
        call_c(xc, t, c)
        record("compiled, fused qkv, channels_last", time_step(call_c, xc, t, c))
    return 0


if __name__ == "__main__":
    sys.exit(main())
