"""Pair generation throughput: the Ray Data job against the same sampler in a plain loop, in one run.

    python benchmarks/bench_pairs.py                                   # CPU, tiny teacher
    python benchmarks/bench_pairs.py --teacher sd15-architecture --resolution 512 --steps 50 --guidance 3 \
        --batch-size 16 --num-pairs 96 --shard-size 32 --diffusers-baseline --compile auto   # one GPU

Rows (pairs/s; "steady" leaves out the first shard, i.e. start-up, model loading and compilation):
  plain loop          the job's actor class (PairShardActor: PairSampler + ShardWriter) called in this process,
                      shard after shard
  ray data job        dmd_ray.distributed.pair_job.generate_pairs: the same actor in a Ray Data actor pool
  diffusers pipeline  (--diffusers-baseline) StableDiffusionPipeline, same components, output_type="latent"

Model FLOPs per pair are counted by torch's FlopCounterMode over one batch of the same sampler (eager; text encoder
and every guided UNet step). Utilisation = steady model FLOP/s / the rate of a large matmul measured on the same
device in the same run (benchmarks/common.py: bf16 8192^3 on a GPU; fp32 2048^3 on a CPU, labelled).
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402

from benchmarks.common import count_flops, default_device, device_name, peak_matmul, print_table  # noqa: E402
from dmd_ray.config import PairsConfig  # noqa: E402
from dmd_ray.data.prompts import BUILTIN_PROMPTS, read_prompts  # noqa: E402

PROMPTS = read_prompts(BUILTIN_PROMPTS)  # the packaged 180 shapes prompts (which prompts does not change the cost)


def plain_loop(cfg: PairsConfig, prompts: list[str]) -> dict:
    from dmd_ray.distributed.pair_job import PairShardActor

    t_start = time.perf_counter()
    writer = PairShardActor(cfg, prompts).writer  # teacher, PairSampler and ShardWriter, as each Ray actor builds them
    t_ready = time.perf_counter()
    done_at = []
    for k in range(cfg.layout.num_shards):
        writer.write_shard(k)
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        done_at.append(time.perf_counter())
    first = len(cfg.layout.shard_range(0))
    return {
        "pairs_per_second": cfg.num_pairs / (done_at[-1] - t_start),
        "steady_pairs_per_second": (cfg.num_pairs - first) / (done_at[-1] - done_at[0]) if len(done_at) > 1 else None,
        "setup_seconds": t_ready - t_start,
    }


def flops_per_pair(cfg: PairsConfig, prompts: list[str]) -> float:
    """Model FLOPs of one pair: one batch of the job's sampler (not compiled: the same ops, counted eagerly)."""
    from dmd_ray.data.pairs import pair_seed
    from dmd_ray.sd.resolve import load_teacher
    from dmd_ray.sd.teacher import resolve_dtype
    from dmd_ray.sd.teacher_sampler import PairSampler

    device = default_device()
    teacher = load_teacher(cfg.teacher, cache_dir=cfg.cache_dir or None)
    sampler = PairSampler(teacher, sampler=cfg.sampler, steps=cfg.steps, guidance_scale=cfg.guidance_scale,
                          resolution=cfg.resolution or teacher.default_resolution, device=device, dtype=resolve_dtype(cfg.dtype, device))
    n = cfg.batch_size
    _, flops = count_flops(sampler, [prompts[i % len(prompts)] for i in range(n)], [pair_seed(cfg.seed, i) for i in range(n)])
    del sampler, teacher
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return flops / n


def ray_job(cfg: PairsConfig) -> dict:
    from dmd_ray.distributed.cluster import init_ray
    from dmd_ray.distributed.pair_job import generate_pairs

    init_ray()
    t_start = time.perf_counter()
    summary = generate_pairs(cfg)
    return {
        "pairs_per_second": cfg.num_pairs / (time.perf_counter() - t_start),
        "steady_pairs_per_second": summary.get("steady_pairs_per_second"),
        "setup_seconds": None,
    }


def diffusers_baseline(cfg: PairsConfig, prompts: list[str]) -> dict:
    from diffusers import StableDiffusionPipeline

    from dmd_ray.sd.resolve import load_teacher
    from dmd_ray.sd.teacher_sampler import make_scheduler

    teacher = load_teacher(cfg.teacher)
    pipe = StableDiffusionPipeline(vae=teacher.vae, text_encoder=teacher.text_encoder, tokenizer=teacher.tokenizer, unet=teacher.unet,
                                   scheduler=make_scheduler(cfg.sampler, teacher.scheduler), safety_checker=None, feature_extractor=None,
                                   requires_safety_checker=False)
    pipe = pipe.to("cuda", torch.float16)
    pipe.set_progress_bar_config(disable=True)
    res = cfg.resolution or teacher.default_resolution

    def batch(i):
        p = [prompts[(i + j) % len(prompts)] for j in range(cfg.batch_size)]
        return pipe(p, height=res, width=res, num_inference_steps=cfg.steps, guidance_scale=cfg.guidance_scale, output_type="latent").images

    batch(0)  # warm-up
    torch.cuda.synchronize()
    n_batches = max(1, cfg.num_pairs // cfg.batch_size)
    t0 = time.perf_counter()
    for i in range(n_batches):
        batch(i * cfg.batch_size)
    torch.cuda.synchronize()
    rate = n_batches * cfg.batch_size / (time.perf_counter() - t0)
    return {"pairs_per_second": rate, "steady_pairs_per_second": rate, "setup_seconds": None}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--teacher", default="tiny")
    p.add_argument("--num-pairs", type=int, default=384)
    p.add_argument("--shard-size", type=int, default=32)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--steps", type=int, default=25)
    p.add_argument("--guidance", type=float, default=3.0)
    p.add_argument("--sampler", default="pndm")
    p.add_argument("--resolution", type=int, default=0)
    p.add_argument("--dtype", default="auto")
    p.add_argument("--compile", default="false", help="the job's compile setting (auto: CUDA graphs on GPU), for the plain loop and the Ray job")
    p.add_argument("--diffusers-baseline", action="store_true")
    p.add_argument("--skip-ray", action="store_true")
    p.add_argument("--json", help="write the results here too")
    args = p.parse_args()

    device = default_device()
    peak = peak_matmul(device)  # before any model is on the device
    print(peak.label, flush=True)
    work = tempfile.mkdtemp(prefix="bench-pairs-")
    base = dict(teacher=args.teacher, prompts=BUILTIN_PROMPTS, num_pairs=args.num_pairs, shard_size=args.shard_size, batch_size=args.batch_size,
                steps=args.steps, guidance_scale=args.guidance, sampler=args.sampler, resolution=args.resolution, dtype=args.dtype, compile=args.compile)
    rows: dict[str, dict] = {}
    name = device_name(device)

    def save(per_pair: float | None = None) -> None:  # after every row, so that a time-boxed run keeps the rows it finished
        if args.json:
            with open(args.json, "w") as f:
                json.dump({"args": vars(args), "device": name, "peak_tflops": peak.tflops, "peak": peak.label, "flops_per_pair": per_pair,
                           "rows": rows}, f, indent=1)

    try:
        if args.diffusers_baseline:
            rows["diffusers pipeline (eager fp16)"] = diffusers_baseline(PairsConfig(**base, out=os.path.join(work, "unused")), PROMPTS)
            save()
        rows["plain loop"] = plain_loop(PairsConfig(**base, out=os.path.join(work, "loop")), PROMPTS)
        save()
        if not args.skip_ray:
            rows["ray data job"] = ray_job(PairsConfig(**base, out=os.path.join(work, "ray")))
            save()
        per_pair = flops_per_pair(PairsConfig(**base, out=os.path.join(work, "unused")), PROMPTS)
        save(per_pair)
    finally:
        shutil.rmtree(work, ignore_errors=True)

    print(f"\npair generation: teacher {args.teacher}, {args.sampler} {args.steps} steps, guidance {args.guidance}, batch {args.batch_size}, "
          f"{args.num_pairs} pairs in shards of {args.shard_size}, {name}, compile={args.compile}")
    print(f"peak: {peak.label}")
    print(f"model FLOPs per pair (FlopCounterMode, one batch of the sampler): {per_pair / 1e12:.4g} TFLOP")
    table = []
    for key, r in rows.items():
        steady = r["steady_pairs_per_second"]
        tflops = steady * per_pair / 1e12 if steady else None
        table.append([key, f"{r['pairs_per_second']:.3f}", f"{steady:.3f}" if steady else "-", f"{tflops:.3g}" if tflops else "-",
                      peak.utilisation(tflops)])
    print_table(["row", "pairs/s", "steady pairs/s", "steady model TFLOP/s", "utilisation"], table)
    if "ray data job" in rows and rows["plain loop"]["steady_pairs_per_second"] and rows["ray data job"]["steady_pairs_per_second"]:
        print(f"ray / plain loop (steady): {rows['ray data job']['steady_pairs_per_second'] / rows['plain loop']['steady_pairs_per_second']:.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
