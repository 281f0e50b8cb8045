"""What makes the teacher's UNet fast: one CFG sampling step (UNet forward at 2x batch), per variant.

    python benchmarks/bench_unet.py --batch 16 [--compile]          # one GPU: SD 1.5 architecture, fp16, 64x64 latents
    python benchmarks/bench_unet.py --teacher tiny --batch 2 --iters 3   # CPU smoke run

A built-in architecture with random weights (speed does not depend on them): SD 1.5 by default (512x512 images,
64x64 latents), fp16 on a GPU, fp32 on a CPU. Prints ms per step, the implied 50-step pairs/s, model TFLOP/s and
utilisation. FLOPs per UNet forward are counted by torch's FlopCounterMode on one eager forward at this batch;
utilisation is against a large matmul measured on the same device in the same run (benchmarks/common.py: bf16
8192^3 on a GPU, fp32 2048^3 on a CPU, labelled).
"""
from __future__ import annotations

import argparse
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402

from benchmarks.common import count_flops, default_device, device_name, peak_matmul, print_table, synchronize  # noqa: E402
from dmd_ray.sd.architectures import BUILT_IN  # noqa: E402


def time_step(fn, x, t, c, device, iters: int) -> float:
    for _ in range(3):
        fn(x, t, c)
    synchronize(device)
    started = time.perf_counter()
    for _ in range(iters):
        fn(x, t, c)
    synchronize(device)
    return (time.perf_counter() - started) / iters


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--teacher", default="sd15-architecture", choices=sorted(BUILT_IN), help="a built-in architecture (random weights)")
    p.add_argument("--batch", type=int, default=16, help="pairs per step (the UNet sees 2x: CFG)")
    p.add_argument("--iters", type=int, default=20, help="timed steps per variant (after 3 untimed)")
    p.add_argument("--compile", action="store_true")
    args = p.parse_args()
    device = default_device()
    gpu = device.type == "cuda"
    dtype = torch.float16 if gpu else torch.float32
    if gpu:
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.benchmark = True
    peak = peak_matmul(device)  # before the model is on the device
    print(peak.label, flush=True)
    teacher = BUILT_IN[args.teacher]().to(device, dtype)
    unet = teacher.unet
    b = 2 * args.batch
    x = torch.randn(b, *teacher.latent_shape(teacher.default_resolution), device=device, dtype=dtype)
    t = torch.full((b,), 500, device=device)
    c = teacher.encode_prompts(["a small red circle on a blue background"]).to(device, dtype).expand(b, -1, -1).contiguous()

    def call(x, t, c):
        with torch.inference_mode():
            return unet(x, t, encoder_hidden_states=c, return_dict=False)[0]

    _, flops = count_flops(call, x, t, c)  # one eager forward at this batch
    print(f"{device_name(device)}, torch {torch.__version__}, {args.teacher}, UNet batch {b} (CFG), {str(dtype).removeprefix('torch.')}; "
          f"{flops / b / 1e12:.4g} TFLOP per image-forward (FlopCounterMode)", flush=True)
    rows = []

    def record(name, seconds):
        tflops = flops / seconds / 1e12
        rows.append([name, f"{seconds * 1e3:.1f}", f"{args.batch / (50 * seconds):.2f}", f"{tflops:.3g}", peak.utilisation(tflops)])
        print(f"{name:40}{seconds * 1e3:9.1f} ms{args.batch / (50 * seconds):9.2f} pairs/s{tflops:>10.3g} TFLOP/s{peak.utilisation(tflops):>7}", flush=True)

    record("eager", time_step(call, x, t, c, device, args.iters))
    unet.to(memory_format=torch.channels_last)
    record("eager, channels_last", time_step(call, x.contiguous(memory_format=torch.channels_last), t, c, device, args.iters))
    unet.to(memory_format=torch.contiguous_format)
    unet.fuse_qkv_projections()
    record("eager, fused qkv", time_step(call, x, t, c, device, args.iters))
    from torch.nn.attention import SDPBackend, sdpa_kernel

    for backend in (SDPBackend.CUDNN_ATTENTION, SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION):
        try:
            with sdpa_kernel(backend):
                record(f"eager, fused qkv, {backend.name.lower()}", time_step(call, x, t, c, device, args.iters))
        except RuntimeError as e:
            print(f"{backend.name}: unavailable ({str(e).splitlines()[0][:80]})")
    if args.compile:
        compiled = torch.compile(unet, fullgraph=True)

        def call_c(x, t, c):
            with torch.inference_mode():
                return compiled(x, t, encoder_hidden_states=c, return_dict=False)[0]

        started = time.perf_counter()
        call_c(x, t, c)
        synchronize(device)
        print(f"compile took {time.perf_counter() - started:.0f} s", flush=True)
        record("compiled, fused qkv", time_step(call_c, x, t, c, device, args.iters))
        with sdpa_kernel(SDPBackend.CUDNN_ATTENTION):
            try:
                call_c(x, t, c)
                record("compiled, fused qkv, cudnn attention", time_step(call_c, x, t, c, device, args.iters))
            except Exception as e:  # noqa: BLE001
                print(f"compiled cudnn attention failed: {str(e).splitlines()[0][:100]}")
        unet.to(memory_format=torch.channels_last)
        xc = x.contiguous(memory_format=torch.channels_last)
        call_c(xc, t, c)
        record("compiled, fused qkv, channels_last", time_step(call_c, xc, t, c, device, args.iters))
    print_table(["variant", "ms/step", "50-step pairs/s", "model TFLOP/s", "utilisation"], rows,
                title=f"{args.teacher}, UNet batch {b}, {device_name(device)}; peak: {peak.label}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
