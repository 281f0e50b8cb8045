"""DMD iteration speed: Ray Train + DeepSpeed against the same iteration in a plain torch loop, in one run.

    python benchmarks/bench_distill.py                                  # CPU: tiny teacher, overhead of the stack
    python benchmarks/bench_distill.py --steps 3 --dm-batch 2 --reg-batch 1 --zero-stages 0   # CPU smoke run
    python benchmarks/bench_distill.py --teacher sd15-architecture --dm-batch 8 --reg-batch 2 \
        --zero-stages 0 2 --gradient-checkpointing --steps 12          # one GPU: samples/s, utilisation, peak memory

Both paths call the DMDStep that `dmd_ray.sd.dmd.build_step` builds, once per batch, exactly as the Ray Train worker
(dmd_ray/distributed/distill_worker.py) does: next batch of pairs, encode its prompts, step, read the logs. They
differ only in the networks and update functions handed to `build_step`: the plain loop passes plain modules with
torch AdamW (`dmd_ray.method.optim.adamw` + `optimizer_update`, the worker's warm-up schedule) in this process and
reads pairs with pyarrow; the job is `dmd_ray.distributed.distill_driver.distill` with one Ray Train worker and two
DeepSpeed engines.

Model FLOPs per iteration are counted by torch's FlopCounterMode over one whole plain-loop iteration (every forward
and backward: generator, real and fake scores, VAE decode and LPIPS), with gradient checkpointing off for that one
iteration so that recomputation is not counted. Utilisation = model FLOP/s / the rate of a large matmul measured
on the same device in the same run (benchmarks/common.py: bf16 8192^3 on a GPU; fp32 2048^3 on a CPU, labelled).
"""
from __future__ import annotations

import argparse
import copy
import dataclasses
import json
import os
import statistics
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import torch  # noqa: E402

from benchmarks.common import Peak, count_flops, default_device, device_name, peak_matmul, print_table, synchronize  # noqa: E402
from dmd_ray.config import DistillConfig, PairsConfig  # noqa: E402
from dmd_ray.data.prompts import BUILTIN_PROMPTS, read_prompts  # noqa: E402

PLAIN = "plain loop (torch AdamW)"
# the pairs' content does not change the cost: a 2-step sampler makes them quickly
PAIR_SAMPLER, PAIR_STEPS = "ddim", 2


def plain_loop(cfg: DistillConfig, pairs_uri: str, steps: int) -> dict:
    """The worker's loop body on plain modules with torch AdamW, in this process."""
    from dmd_ray.distributed.pair_job import PairStream, read_with_pyarrow
    from dmd_ray.method.objective import read_logs
    from dmd_ray.method.optim import adamw, optimizer_update
    from dmd_ray.sd.conditioning import PromptConditions
    from dmd_ray.sd.dmd import build_step
    from dmd_ray.sd.resolve import load_teacher
    from dmd_ray.sd.teacher import UNetDenoiser

    device = default_device()
    dtype = torch.bfloat16 if cfg.precision == "bf16" else torch.float32
    teacher = load_teacher(cfg.teacher, cache_dir=cfg.cache_dir or None)
    unets, nets, updates = [], [], []
    for lr in (cfg.lr, cfg.fake_lr or cfg.lr):  # generator, fake score: each a copy of the teacher's UNet
        unet = copy.deepcopy(teacher.unet).train().requires_grad_(True).to(device, dtype)
        params = list(unet.parameters())
        optimizer, scheduler = adamw(params, lr, max(1, cfg.warmup_steps), weight_decay=cfg.weight_decay)
        unets.append(unet)
        nets.append(UNetDenoiser(unet))
        updates.append(optimizer_update(optimizer, params, cfg.grad_clip, scheduler))
    teacher.to(device=device, dtype=dtype)
    latent_shape = teacher.latent_shape(cfg.resolution or teacher.default_resolution)
    prompts = read_prompts(cfg.prompts or BUILTIN_PROMPTS)
    conditions = PromptConditions(teacher, prompts, latent_shape, device)
    conditions.encode(prompts)  # encode the prompt set once, so that the counted and timed iterations are steady ones
    rng = torch.Generator("cpu").manual_seed(cfg.seed * 1000)  # rank 0's
    step_fn = build_step(cfg, teacher, conditions, nets[0], nets[1], updates[0], updates[1], rng, cfg.local_dm_batch, device)
    stream = PairStream(pairs_uri, cfg.local_reg_batch, 0, 1, cfg.seed, read=read_with_pyarrow)

    def iteration() -> dict:  # the worker's loop body
        batch = next(stream)
        pair_cond = conditions.encode(batch["prompt"]) if step_fn.objective.uses_regression else None
        return read_logs(step_fn(batch["noise"].to(device, torch.float32), pair_cond, batch["target"].to(device, torch.float32)))

    # model FLOPs: one iteration without gradient checkpointing (its recomputation is not model work)
    flops_include_recompute = False
    try:
        _, flops = count_flops(iteration)
    except torch.cuda.OutOfMemoryError:
        if not cfg.gradient_checkpointing:
            raise
        torch.cuda.empty_cache()
        for unet in unets:
            unet.enable_gradient_checkpointing()
        _, flops = count_flops(iteration)
        flops_include_recompute = True
    if cfg.gradient_checkpointing:
        for unet in unets:
            unet.enable_gradient_checkpointing()
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    times = []
    for _ in range(steps):
        synchronize(device)
        started = time.perf_counter()
        iteration()
        synchronize(device)
        times.append(time.perf_counter() - started)
    stream.close()
    out = {"step_time_s": statistics.median(times[2:] if len(times) > 4 else times), "flops_per_iteration": flops,
           "flops_include_recompute": flops_include_recompute}
    if device.type == "cuda":
        out["peak_memory_gib"] = torch.cuda.max_memory_allocated() / 2**30
    del teacher, nets, unets, updates, step_fn, conditions
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return out


def ray_job(cfg: DistillConfig) -> dict:
    from dmd_ray.distributed.distill_driver import distill
    from dmd_ray.distributed.run_records import read_history

    distill(cfg)
    history = read_history(cfg.output)
    times = [r["step_time_s"] for r in history[1:]] or [r["step_time_s"] for r in history]
    out = {"step_time_s": statistics.median(times)}
    if "peak_memory_gib" in history[-1]:
        out["peak_memory_gib"] = max(r["peak_memory_gib"] for r in history)
    return out


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--teacher", default="tiny")
    p.add_argument("--dm-batch", type=int, default=8)
    p.add_argument("--reg-batch", type=int, default=4)
    p.add_argument("--steps", type=int, default=30)
    p.add_argument("--zero-stages", type=int, nargs="*", default=[0, 2], help="one Ray Train + DeepSpeed row per stage; none: plain loop only")
    p.add_argument("--regression-space", default="pixel", choices=("pixel", "latent"))
    p.add_argument("--precision", default="bf16", choices=("bf16", "fp32"))
    p.add_argument("--gradient-checkpointing", action="store_true")
    p.add_argument("--skip-plain", action="store_true")
    p.add_argument("--json", help="write the results here too")
    args = p.parse_args()
    device = default_device()
    gpu = device.type == "cuda"
    peak: Peak = peak_matmul(device)  # before any model is on the device
    print(peak.label, flush=True)
    work = tempfile.mkdtemp(prefix="bench-distill-")

    from dmd_ray.distributed.cluster import init_ray
    from dmd_ray.distributed.pair_job import generate_pairs

    init_ray()
    pairs_uri = os.path.join(work, "pairs")
    n_pairs = max(16, args.reg_batch * (args.steps + 4))
    generate_pairs(PairsConfig(teacher=args.teacher, prompts=BUILTIN_PROMPTS, num_pairs=n_pairs, shard_size=n_pairs, steps=PAIR_STEPS,
                               sampler=PAIR_SAMPLER, out=pairs_uri, batch_size=8))
    base = DistillConfig(
        teacher=args.teacher, pairs=pairs_uri, pair_sampler=PAIR_SAMPLER, pair_steps=PAIR_STEPS, dm_batch_size=args.dm_batch,
        reg_batch_size=args.reg_batch, max_steps=args.steps, num_workers=1, lr=1e-5, warmup_steps=10, regression_space=args.regression_space,
        lpips_backbone="vgg", lpips_pretrained_backbone=False, precision=args.precision, gradient_checkpointing=args.gradient_checkpointing,
        checkpoint_every=0, sample_every=0, export=False, log_every=10, cpus_per_worker=float(os.cpu_count() or 1) if not gpu else 4.0,
    )
    rows: dict[str, dict] = {}
    if not args.skip_plain:
        rows[PLAIN] = plain_loop(base, pairs_uri, args.steps)
    for stage in args.zero_stages:
        cfg = dataclasses.replace(base, zero_stage=stage, output=os.path.join(work, f"zero{stage}"))
        try:
            rows[f"ray train + deepspeed ZeRO-{stage}"] = ray_job(cfg)
        except Exception as e:  # noqa: BLE001 - an OOM at this batch is a result too
            rows[f"ray train + deepspeed ZeRO-{stage}"] = {"error": f"{type(e).__name__}: {str(e).splitlines()[0][:200] if str(e) else ''}"}

    counted = rows.get(PLAIN, {})
    flops = counted.get("flops_per_iteration")
    samples = args.dm_batch + args.reg_batch
    print(f"\nDMD iteration: teacher {args.teacher}, DM batch {args.dm_batch} + regression batch {args.reg_batch} ({args.regression_space}), "
          f"{args.precision}, gradient checkpointing {args.gradient_checkpointing}, {device_name(device)}")
    print(f"peak: {peak.label}")
    if flops:
        note = " (includes gradient-checkpointing recomputation: the iteration without it ran out of memory)" if counted["flops_include_recompute"] else ""
        print(f"model FLOPs per iteration (FlopCounterMode, one plain-loop iteration): {flops / 1e12:.4g} TFLOP, "
              f"{flops / samples / 1e12:.4g} TFLOP per sample (DM and regression together){note}")
    else:
        print("model FLOPs: not counted (--skip-plain)")
    plain_time = rows[PLAIN]["step_time_s"] if PLAIN in rows and "error" not in rows[PLAIN] else None
    table = []
    for name, r in rows.items():
        if "error" in r:
            table.append([name, f"failed: {r['error']}", "", "", "", "", ""])
            continue
        tflops = flops / r["step_time_s"] / 1e12 if flops else None
        table.append([
            name, f"{r['step_time_s']:.3f}", f"{samples / r['step_time_s']:.2f}", f"{tflops:.3g}" if tflops else "-", peak.utilisation(tflops),
            f"{r['peak_memory_gib']:.1f}" if "peak_memory_gib" in r else "-", f"{r['step_time_s'] / plain_time:.2f}x" if plain_time else "-",
        ])
    print_table(["row", "s/iteration", "samples/s", "model TFLOP/s", "utilisation", "peak GiB", "time vs plain loop"], table)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"args": vars(args), "device": device_name(device), "peak_tflops": peak.tflops, "peak": peak.label,
                       "flops_per_iteration": flops, "rows": rows}, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
