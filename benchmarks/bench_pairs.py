"""Pair generation throughput: the Ray Data job against the same sampler in a plain loop, in one run.

    python benchmarks/bench_pairs.py                                   # CPU, tiny teacher
    python benchmarks/bench_pairs.py --teacher sd15-architecture --resolution 512 --steps 50 --guidance 3 \
        --batch-size 16 --num-pairs 96 --shard-size 32 --diffusers-baseline --compile   # one GPU

Rows (pairs/s; "steady" leaves out the first shard, i.e. start-up, model loading and compilation):
  plain loop          ShardWriter in this process: sample + write shards one after another
  ray data job        jobs/generate_pairs.run: the same writer in a Ray Data actor pool
  diffusers pipeline  (--diffusers-baseline) StableDiffusionPipeline, same components, output_type="latent"
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import shutil
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "jobs"))

import torch  # noqa: E402

from dmd_ray import pairs  # noqa: E402

PROMPTS = [f"a {size} {colour} {shape} on a {bg} background" for size in ("small", "large") for colour in ("red", "green", "blue")
           for shape in ("circle", "square", "triangle") for bg in ("white", "black")]


def plain_loop(cfg: pairs.PairsConfig, prompts: list[str]) -> dict:
    t_start = time.perf_counter()
    writer = pairs.ShardWriter(dataclasses.asdict(cfg), prompts)
    t_ready = time.perf_counter()
    done_at = []
    for k in range(cfg.num_shards):
        writer.write_shard(k)
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        done_at.append(time.perf_counter())
    first = len(cfg.shard_range(0))
    return {
        "pairs_per_second": cfg.num_pairs / (done_at[-1] - t_start),
        "steady_pairs_per_second": (cfg.num_pairs - first) / (done_at[-1] - done_at[0]) if len(done_at) > 1 else None,
        "setup_seconds": t_ready - t_start,
    }


def ray_job(cfg: pairs.PairsConfig) -> dict:
    import generate_pairs
    from dmd_ray.ray_utils import init_ray

    init_ray()
    t_start = time.perf_counter()
    summary = generate_pairs.run(cfg)
    return {
        "pairs_per_second": cfg.num_pairs / (time.perf_counter() - t_start),
        "steady_pairs_per_second": summary.get("steady_pairs_per_second"),
        "setup_seconds": None,
    }


def diffusers_baseline(cfg: pairs.PairsConfig, prompts: list[str]) -> dict:
    from diffusers import StableDiffusionPipeline

    from dmd_ray.models import load_teacher
    from dmd_ray.sampling import make_scheduler

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
    p.add_argument("--compile", action="store_true", help="torch.compile the UNet in both plain loop and Ray job")
    p.add_argument("--diffusers-baseline", action="store_true")
    p.add_argument("--skip-ray", action="store_true")
    p.add_argument("--json", help="write the results here too")
    args = p.parse_args()

    work = tempfile.mkdtemp(prefix="bench-pairs-")
    prompts_path = os.path.join(work, "prompts.txt")
    with open(prompts_path, "w") as f:
        f.write("\n".join(PROMPTS))
    base = dict(teacher=args.teacher, prompts=prompts_path, num_pairs=args.num_pairs, shard_size=args.shard_size, batch_size=args.batch_size,
                steps=args.steps, guidance_scale=args.guidance, sampler=args.sampler, resolution=args.resolution, dtype=args.dtype, compile=args.compile)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    rows: dict[str, dict] = {}
    try:
        if args.diffusers_baseline:
            rows["diffusers pipeline (eager fp16)"] = diffusers_baseline(pairs.PairsConfig(**base, out=os.path.join(work, "unused")), PROMPTS)
        rows["plain loop"] = plain_loop(pairs.PairsConfig(**base, out=os.path.join(work, "loop")), PROMPTS)
        if not args.skip_ray:
            rows["ray data job"] = ray_job(pairs.PairsConfig(**base, out=os.path.join(work, "ray")))
    finally:
        shutil.rmtree(work, ignore_errors=True)

    name = torch.cuda.get_device_name() if device == "cuda" else f"CPU ({os.cpu_count()} cores, {torch.get_num_threads()} threads)"
    print(f"\npair generation: teacher {args.teacher}, {args.sampler} {args.steps} steps, guidance {args.guidance}, batch {args.batch_size}, "
          f"{args.num_pairs} pairs in shards of {args.shard_size}, {name}, compile={args.compile}")
    print(f"{'':34}{'pairs/s':>10}{'steady pairs/s':>16}")
    for key, r in rows.items():
        steady = f"{r['steady_pairs_per_second']:.3f}" if r["steady_pairs_per_second"] else "-"
        print(f"{key:34}{r['pairs_per_second']:>10.3f}{steady:>16}")
    if "ray data job" in rows and rows["plain loop"]["steady_pairs_per_second"] and rows["ray data job"]["steady_pairs_per_second"]:
        print(f"ray / plain loop (steady): {rows['ray data job']['steady_pairs_per_second'] / rows['plain loop']['steady_pairs_per_second']:.3f}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"args": vars(args), "device": name, "rows": rows}, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
