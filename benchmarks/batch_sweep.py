"""The per-GPU batch that maximises a DMD iteration's samples/s: the plain loop of bench_distill.py (the worker's step
on plain modules, in the numerics of a ZeRO stage) at growing (DM, regression) batches, until one runs out of memory.

    python benchmarks/batch_sweep.py --batches 2x1,4x2 --steps 4                      # CPU smoke run, tiny teacher
    python benchmarks/batch_sweep.py --teacher sd15-architecture --zero-stage 2 --gradient-checkpointing \
        --batches 16x4,32x8,48x12,64x16 --compile false --steps 6 --log-every 3          # one GPU: the SD 1.5 sweep

Each row: seconds per iteration (median of the windows after the first), samples/s, model FLOPs per iteration
(FlopCounterMode over one eager iteration without gradient checkpointing), MFU against the matmul peak measured in
the same run, peak memory. The batch with the most samples/s is named at the end; the Ray Train + DeepSpeed row at
that batch is bench_distill.py's. Rows are written to --json as they end.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402

from benchmarks.bench_distill import bench_config, make_pairs, plain_loop  # noqa: E402
from benchmarks.common import default_device, device_name, peak_matmul, print_table  # noqa: E402


def batches(text: str) -> list[tuple[int, int]]:
    """"16x4,32x8" -> [(16, 4), (32, 8)]: DM batch x regression batch."""
    try:
        pairs = [tuple(int(n) for n in item.split("x")) for item in text.split(",")]
    except ValueError:
        pairs = []
    if not pairs or any(len(p) != 2 or min(p) < 1 for p in pairs):
        raise argparse.ArgumentTypeError(f"--batches takes DMxREG pairs of positive integers separated by commas (16x4,32x8), got {text!r}")
    return pairs


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--teacher", default="tiny")
    p.add_argument("--batches", type=batches, default=batches("2x1,4x2"), help="DMxREG per row, e.g. 16x4,32x8")
    p.add_argument("--zero-stage", type=int, default=2, help="whose numerics the plain loop runs in (0: fp32 weights under autocast; 1-3: bf16 weights)")
    p.add_argument("--steps", type=int, default=6)
    p.add_argument("--log-every", type=int, default=3)
    p.add_argument("--compile", default="false", help="compiling recompiles at every batch (static shapes): false sweeps quickly")
    p.add_argument("--regression-space", default="pixel", choices=("pixel", "latent"))
    p.add_argument("--lpips-backbone", default="vgg")
    p.add_argument("--lpips-min-size", type=int, default=224)
    p.add_argument("--gradient-checkpointing", action="store_true")
    p.add_argument("--json", help="write the rows here as they end")
    args = p.parse_args()
    device = default_device()
    peak = peak_matmul(device)
    print(peak.label, flush=True)

    largest_reg = max(reg for _, reg in args.batches)
    pairs_uri = make_pairs(args.teacher, largest_reg, args.steps + 2 * args.log_every + 4, tempfile.mkdtemp(prefix="batch-sweep-"))
    rows = []
    for dm, reg in args.batches:
        cfg = bench_config(args, pairs_uri, device.type == "cuda", dm_batch_size=dm, reg_batch_size=reg, zero_stage=args.zero_stage)
        try:
            row = {"dm_batch": dm, "reg_batch": reg, **plain_loop(cfg, pairs_uri, args.steps)}
        except torch.cuda.OutOfMemoryError as e:
            row = {"dm_batch": dm, "reg_batch": reg, "error": f"out of memory: {str(e).splitlines()[0][:160]}"}
        rows.append(row)
        print(f"[batch_sweep] {json.dumps(row)}", flush=True)
        if args.json:
            with open(args.json, "w") as f:
                json.dump({"args": vars(args), "device": device_name(device), "peak": peak.label, "rows": rows}, f, indent=1)
        if "error" in row:
            break  # larger batches need more memory still
        if device.type == "cuda":
            torch.cuda.empty_cache()

    print(f"\nDMD iteration by per-GPU batch: teacher {args.teacher}, ZeRO-{args.zero_stage} numerics, plain loop, compile {args.compile}, "
          f"regression {args.regression_space} (LPIPS-{args.lpips_backbone} at {args.lpips_min_size}), gradient checkpointing "
          f"{args.gradient_checkpointing}, {device_name(device)}, {time.strftime('%Y-%m-%d')}; {peak.label}")
    table = []
    for r in rows:
        if "error" in r:
            table.append([f"{r['dm_batch']} + {r['reg_batch']}", r["error"], "", "", "", ""])
            continue
        samples = (r["dm_batch"] + r["reg_batch"]) / r["step_time_s"]
        tflops = r["flops_per_iteration"] / r["step_time_s"] / 1e12
        r["samples_per_s"] = samples
        table.append([f"{r['dm_batch']} + {r['reg_batch']}", f"{r['step_time_s']:.3f}", f"{samples:.1f}", f"{tflops:.3g}", peak.utilisation(tflops),
                      f"{r['peak_memory_gib']:.1f}" if "peak_memory_gib" in r else "-"])
    print_table(["DM + regression batch", "s/iteration", "samples/s", "model TFLOP/s", "MFU", "peak GiB"], table)
    done = [r for r in rows if "error" not in r]
    if done:
        best = max(done, key=lambda r: r["samples_per_s"])
        print(f"most samples/s: DM {best['dm_batch']} + regression {best['reg_batch']} ({best['samples_per_s']:.1f} samples/s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
