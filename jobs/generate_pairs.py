"""Generate (noise, teacher ODE output) pairs with Ray Data, into Parquet shards on local disk or S3.

    python jobs/generate_pairs.py --teacher tiny --prompts prompts.txt --num-pairs 4096 --out s3://bucket/pairs
    ray job submit --working-dir . -- python jobs/generate_pairs.py --config my.yaml

Each missing shard is one Ray Data row; an actor pool (one actor per GPU by default) runs the teacher's guided ODE
sampler and writes whole shards, atomically. A rerun writes only the missing shards. See dmd_ray/pairs.py for the
data contract and every config key (`--help` lists them).
"""
from __future__ import annotations

import dataclasses
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # the repo root, for `ray job submit`

from dmd_ray import pairs, storage  # noqa: E402
from dmd_ray.config import parse_args  # noqa: E402
from dmd_ray.models import describe_teacher  # noqa: E402


def log(msg: str) -> None:
    print(f"[generate_pairs {time.strftime('%H:%M:%S')}] {msg}", flush=True)


def prepare(cfg: pairs.PairsConfig) -> tuple[list[str], dict, list[int]]:
    """Every check that can fail before sampling: config values, prompts, teacher, output location and contents."""
    cfg.validate()
    prompts = pairs.read_prompts(cfg.prompts)
    info = describe_teacher(cfg.teacher, cfg.cache_dir or None)
    resolution = cfg.resolution or info.default_resolution
    latent_shape = info.latent_shape(resolution)
    storage.check_access(cfg.out, write=True)
    # the sampling dtype is part of what makes pairs interchangeable; "auto" resolves on the workers' device kind
    device = "cuda" if _workers_have_gpus(cfg) else "cpu"
    config = pairs.manifest_config(cfg, latent_shape, resolution, pairs.resolve_dtype(cfg.dtype, device), prompts)
    done = pairs.check_output(cfg.out, config)
    return prompts, config, done


def _workers_have_gpus(cfg: pairs.PairsConfig) -> bool:
    from dmd_ray.ray_utils import cluster_gpus

    return cfg.gpus_per_actor > 0 or (cfg.gpus_per_actor < 0 and cluster_gpus() > 0)


def run(cfg: pairs.PairsConfig) -> dict:
    """Generates the missing shards of `cfg.out`; returns a summary. Ray must be initialised."""
    import ray
    from dmd_ray.ray_utils import cluster_gpus

    started = time.time()
    # the actors run in other directories: every local path becomes absolute here
    cfg = dataclasses.replace(cfg, out=storage.absolute(cfg.out), prompts=storage.absolute(cfg.prompts),
                              teacher=storage.absolute(cfg.teacher, only_if_exists=True), cache_dir=storage.absolute(cfg.cache_dir))
    prompts, config, done = prepare(cfg)
    missing = [k for k in range(cfg.num_shards) if k not in set(done)]
    pairs.write_manifest(cfg.out, config, done, {"status": "running"})
    log(f"teacher {cfg.teacher}, {cfg.sampler} {cfg.steps} steps, guidance {cfg.guidance_scale}, latents {config['latent_shape']} ({config['dtype']})")
    log(f"{cfg.num_pairs} pairs in {cfg.num_shards} shards of {cfg.shard_size} at {cfg.out}: {len(done)} done, {len(missing)} to make")

    made_pairs, elapsed, num_actors = 0, 0.0, 0
    shard_timings: list[tuple[int, float]] = []  # (pairs, seconds) per shard, timed inside the actor
    if missing:
        gpus = cluster_gpus()
        gpus_per_actor = cfg.gpus_per_actor if cfg.gpus_per_actor >= 0 else (1.0 if gpus > 0 else 0.0)
        num_actors = cfg.num_actors or (max(1, int(gpus // gpus_per_actor)) if gpus_per_actor > 0 else 1)
        num_actors = min(num_actors, len(missing))
        # on CPU, split this node's cores between the actors instead of letting every actor take all of them
        threads = None if gpus_per_actor > 0 else max(1, (os.cpu_count() or 1) // num_actors)
        log(f"{num_actors} actor(s), {gpus_per_actor} GPU and {cfg.cpus_per_actor} CPU each")
        ds = ray.data.from_items([{"shard": k} for k in missing], override_num_blocks=len(missing))
        ds = ds.map_batches(
            pairs.ShardWriter,
            fn_constructor_kwargs={"cfg": dataclasses.asdict(cfg), "prompts": prompts, "threads": threads},
            batch_size=1,
            compute=ray.data.ActorPoolStrategy(size=num_actors),
            num_gpus=gpus_per_actor,
            num_cpus=cfg.cpus_per_actor,
        )
        t0 = time.time()
        completed = list(done)
        for row in ds.iter_rows():
            completed.append(int(row["shard"]))
            made_pairs += int(row["rows"])
            elapsed = time.time() - t0
            shard_timings.append((int(row["rows"]), float(row["seconds"])))
            remaining = cfg.num_pairs - sum(len(cfg.shard_range(k)) for k in completed)
            rate = made_pairs / elapsed if elapsed > 0 else 0.0
            eta = f", about {remaining / rate:.0f} s left" if rate > 0 and remaining else ""
            log(f"shard {int(row['shard'])} written ({int(row['rows'])} pairs in {float(row['seconds']):.1f} s); {len(completed)}/{cfg.num_shards} shards, {rate:.2f} pairs/s{eta}")
            pairs.write_manifest(cfg.out, config, completed, {"status": "running"})

    complete = pairs.completed_shards(cfg.out)
    if len([k for k in complete if k < cfg.num_shards]) != cfg.num_shards:
        raise RuntimeError(f"{cfg.out}: only {len(complete)} of {cfg.num_shards} shards exist after the run")
    summary = {
        "pairs_total": cfg.num_pairs,
        "pairs_made": made_pairs,
        "seconds_sampling": round(elapsed, 2),
        "pairs_per_second": round(made_pairs / elapsed, 3) if elapsed > 0 else None,
        # per actor, from the shards after each actor's first (which pays for model loading and compilation),
        # times the number of actors: the rate once everything is warm
        "steady_pairs_per_second": _steady_rate(shard_timings, num_actors if missing else 0),
        "seconds_total": round(time.time() - started, 2),
    }
    pairs.write_manifest(cfg.out, config, complete, {"status": "complete", "last_run": summary})
    rate = f"{summary['pairs_per_second']} pairs/s" if summary["pairs_per_second"] else "nothing to do"
    log(f"done: {made_pairs} new pairs in {elapsed:.1f} s ({rate}); {cfg.num_pairs} pairs at {cfg.out}")
    return summary


def _steady_rate(timings: list[tuple[int, float]], num_actors: int) -> float | None:
    warm = timings[num_actors:]
    if not num_actors or not warm:
        return None
    return round(num_actors * sum(n for n, _ in warm) / sum(s for _, s in warm), 3)


def main(argv: list[str] | None = None) -> int:
    from dmd_ray.ray_utils import init_ray

    cfg = parse_args(pairs.PairsConfig, argv, description=__doc__.split("\n\n")[0])
    try:
        cfg.validate()
    except ValueError as e:
        print(f"generate_pairs: error: {e}", file=sys.stderr)
        return 2
    init_ray()
    try:
        run(cfg)
    except (ValueError, FileNotFoundError, storage.StorageError) as e:
        print(f"generate_pairs: error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
