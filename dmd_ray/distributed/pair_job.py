"""The Ray Data side of pairs: generating a pairs dataset with an actor pool, and reading one back per worker.

`generate_pairs(cfg)` runs the teacher's guided ODE sampler in an actor pool (one actor per GPU by default) that
writes whole shards, atomically; a rerun writes only the missing shards (data/pairs.py has the contract).
`PairStream` feeds one Ray Train worker its share of the shards, in an order that replays exactly after a resume.
"""
from __future__ import annotations

import dataclasses
import os
import time
from typing import Any, Iterator

import numpy as np
import torch

from dmd_ray.config import PairsConfig
from dmd_ray.data import pairs, storage
from dmd_ray.data.prompts import read_prompts
from dmd_ray.distributed.cluster import cluster_gpus, gpus_per_actor, init_ray
from dmd_ray.sd.resolve import describe_teacher, load_teacher
from dmd_ray.sd.teacher import resolve_dtype
from dmd_ray.sd.teacher_sampler import PairSampler


def log(msg: str) -> None:
    print(f"[generate_pairs {time.strftime('%H:%M:%S')}] {msg}", flush=True)


def prepare(cfg: PairsConfig) -> tuple[list[str], dict, list[int]]:
    """Every check that can fail before sampling: config values, prompts, teacher, output location and contents.
    Joins or starts Ray (cluster.init_ray) before the output's contents, whose sampling dtype depends on the cluster."""
    cfg.check()
    prompts = read_prompts(cfg.prompts)
    info = describe_teacher(cfg.teacher, cfg.cache_dir or None)
    resolution = cfg.resolution or info.default_resolution
    latent_shape = info.latent_shape(resolution)
    storage.check_access(cfg.out, write=True)
    # Ray only now (a refused job starts no cluster): the sampling dtype, part of what makes pairs interchangeable,
    # resolves "auto" on the workers' device kind, which is the cluster's
    init_ray()
    device = "cuda" if gpus_per_actor(cfg.gpus_per_actor) > 0 else "cpu"
    config = manifest_config(cfg, latent_shape, resolution, resolve_dtype(cfg.dtype, device), prompts)
    done = pairs.check_output(cfg.out, config)
    return prompts, config, done


def manifest_config(cfg: PairsConfig, latent_shape, resolution: int, dtype: torch.dtype, prompts: list[str]) -> dict:
    return pairs.manifest_config(teacher=cfg.teacher, sampler=cfg.sampler, steps=cfg.steps, guidance_scale=cfg.guidance_scale, resolution=resolution,
                                 latent_shape=latent_shape, dtype=dtype, seed=cfg.seed, layout=cfg.layout, prompts=prompts)


def generate_pairs(cfg: PairsConfig) -> dict:
    """Generates the missing shards of `cfg.out` with a Ray Data actor pool; returns a summary."""
    import ray

    started = time.time()
    # the actors run in other directories: every local path becomes absolute here
    cfg = dataclasses.replace(cfg, out=storage.absolute(cfg.out), prompts=storage.absolute(cfg.prompts),
                              teacher=storage.absolute(cfg.teacher, only_if_exists=True), cache_dir=storage.absolute(cfg.cache_dir))
    prompts, config, done = prepare(cfg)
    layout = cfg.layout
    missing = [k for k in range(layout.num_shards) if k not in set(done)]
    pairs.write_manifest(cfg.out, config, done, {"status": "running"})
    log(f"teacher {cfg.teacher}, {cfg.sampler} {cfg.steps} steps, guidance {cfg.guidance_scale}, latents {config['latent_shape']} ({config['dtype']})")
    log(f"{cfg.num_pairs} pairs in {layout.num_shards} shards of {cfg.shard_size} at {cfg.out}: {len(done)} done, {len(missing)} to make")

    made_pairs, elapsed, num_actors = 0, 0.0, 0
    shard_timings: list[tuple[int, float]] = []  # (pairs, seconds) per shard, timed inside the actor
    if missing:
        gpus = gpus_per_actor(cfg.gpus_per_actor)
        num_actors = cfg.num_actors or (max(1, int(cluster_gpus() // gpus)) if gpus > 0 else 1)
        num_actors = min(num_actors, len(missing))
        # on CPU, split this node's cores between the actors instead of letting every actor take all of them
        threads = None if gpus > 0 else max(1, (os.cpu_count() or 1) // num_actors)
        log(f"{num_actors} actor(s), {gpus} GPU and {cfg.cpus_per_actor} CPU each")
        ds = ray.data.from_items([{"shard": k} for k in missing], override_num_blocks=len(missing))
        ds = ds.map_batches(
            PairShardActor,
            fn_constructor_kwargs={"cfg": cfg, "prompts": prompts, "threads": threads},
            batch_size=1,
            compute=ray.data.ActorPoolStrategy(size=num_actors),
            num_gpus=gpus,
            num_cpus=cfg.cpus_per_actor,
        )
        t0 = time.time()
        completed = list(done)
        for row in ds.iter_rows():
            completed.append(int(row["shard"]))
            made_pairs += int(row["rows"])
            elapsed = time.time() - t0
            shard_timings.append((int(row["rows"]), float(row["seconds"])))
            remaining = cfg.num_pairs - sum(len(layout.shard_range(k)) for k in completed)
            rate = made_pairs / elapsed if elapsed > 0 else 0.0
            eta = f", about {remaining / rate:.0f} s left" if rate > 0 and remaining else ""
            log(f"shard {int(row['shard'])} written ({int(row['rows'])} pairs in {float(row['seconds']):.1f} s); {len(completed)}/{layout.num_shards} shards, {rate:.2f} pairs/s{eta}")
            pairs.write_manifest(cfg.out, config, completed, {"status": "running"})

    complete = pairs.completed_shards(cfg.out)
    if len([k for k in complete if k < layout.num_shards]) != layout.num_shards:
        raise RuntimeError(f"{cfg.out}: only {len(complete)} of {layout.num_shards} shards exist after the run")
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


class PairShardActor:
    """Ray Data actor: one row per shard index in, that shard made with the teacher's sampler and written."""

    def __init__(self, cfg: PairsConfig, prompts: list[str], device: str | None = None, threads: int | None = None):
        if threads:
            torch.set_num_threads(max(1, threads))
        device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        teacher = load_teacher(cfg.teacher, cache_dir=cfg.cache_dir or None)
        sampler = PairSampler(teacher, sampler=cfg.sampler, steps=cfg.steps, guidance_scale=cfg.guidance_scale,
                              resolution=cfg.resolution or teacher.default_resolution, device=device,
                              dtype=resolve_dtype(cfg.dtype, device), compile_mode=cfg.compile_mode(device.type), batch_size=cfg.batch_size)
        provenance = {"teacher": cfg.teacher, "sampler": cfg.sampler, "steps": cfg.steps, "guidance_scale": cfg.guidance_scale}
        self.writer = pairs.ShardWriter(cfg.out, cfg.layout, prompts, cfg.seed, sampler, cfg.batch_size, provenance)

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        shards, rows, seconds = [], [], []
        for k in batch["shard"]:
            started = time.perf_counter()
            rows.append(self.writer.write_shard(int(k)))
            shards.append(int(k))
            seconds.append(time.perf_counter() - started)
        return {"shard": np.array(shards), "rows": np.array(rows), "seconds": np.array(seconds)}


def ray_dataset(uri: str, columns: list[str] | None = None):
    """The pairs as a Ray Dataset (tensor columns come back as ndarrays), read through the same filesystem."""
    import ray.data

    shards = pairs.shard_uris(uri)
    fs, _ = storage.resolve(uri)
    paths = [storage.resolve(s)[1] for s in shards]
    return ray.data.read_parquet(paths, filesystem=fs, columns=columns, shuffle=None)


STREAM_COLUMNS = ["prompt", "noise", "target"]


def read_with_ray_data(files: list[str], chunk_size: int) -> Iterator[dict[str, np.ndarray]]:
    """Shards in the given order, rows in file order, as numpy chunks (Ray Data, with preserve_order set)."""
    import ray.data

    fs, _ = storage.resolve(files[0])
    ds = ray.data.read_parquet([storage.resolve(f)[1] for f in files], filesystem=fs, columns=STREAM_COLUMNS, shuffle=None, num_cpus=0.25)
    return ds.iter_batches(batch_size=chunk_size, batch_format="numpy")


def read_with_pyarrow(files: list[str], chunk_size: int) -> Iterator[dict[str, np.ndarray]]:
    """The same chunks as `read_with_ray_data`, read in this process (no Ray): for tests and plain loops."""
    for batch in pairs.iter_pairs_files(files, chunk_size, STREAM_COLUMNS):
        yield {"prompt": np.array(batch["prompt"]), "noise": batch["noise"].numpy(), "target": batch["target"].numpy()}


class PairStream:
    """Endless batches of pairs for one of `world` workers, in an order that can be replayed exactly.

    The worker owns shards k with k % world == rank; each epoch visits them in an order drawn from (seed, rank,
    epoch) and reads them through Ray Data (read_parquet with preserve_order), rows in file order. `state()` is
    (epoch, rows consumed in the epoch); a stream built from it continues with exactly the next batch. Batches never
    straddle epochs (the short tail of an epoch is dropped). `read(files, chunk_size)` yields the rows of the files
    in order as numpy chunks: Ray Data by default, `read_with_pyarrow` without Ray.

    A worker's shards are kept in memory once read, up to `memory_bytes` in all: a new pass then costs no read (a
    Ray Data execution costs ~16 s on 2 CPU cores, once per pass of the README demo's 64 pairs per worker).
    """

    def __init__(self, uri: str, batch_size: int, rank: int, world: int, seed: int, state: dict | None = None, read=None,
                 memory_bytes: int = 256 << 20):
        manifest = pairs.load_manifest(uri)
        shards = pairs.shard_uris(uri)
        layout = pairs.ShardLayout(manifest["config"]["num_pairs"], manifest["config"]["shard_size"])
        self.mine = [(shards[k], len(layout.shard_range(k))) for k in range(len(shards)) if k % world == rank]
        if not self.mine:
            raise ValueError(f"pairs {uri} have {len(shards)} shards: none for worker {rank} of {world}")
        per_epoch = sum(n for _, n in self.mine)
        if per_epoch < batch_size:
            raise ValueError(f"worker {rank} of {world} has {per_epoch} pairs, fewer than its batch of {batch_size}")
        self.uri, self.batch_size, self.rank, self.seed = uri, batch_size, rank, seed
        self.read = read or read_with_ray_data
        self.epoch = int((state or {}).get("epoch", 0))
        self.consumed = int((state or {}).get("consumed", 0))
        self._batches: Iterator[dict[str, Any]] | None = None
        self.memory_bytes = memory_bytes
        self._kept: dict[str, dict[str, np.ndarray]] | None = {}  # shard -> its rows; None once over memory_bytes

    def state(self) -> dict:
        return {"epoch": self.epoch, "consumed": self.consumed}

    def _epoch_order(self, epoch: int) -> list[tuple[str, int]]:
        order = np.random.default_rng([self.seed, self.rank, epoch]).permutation(len(self.mine))
        return [self.mine[i] for i in order]

    def _epoch_batches(self) -> Iterator[dict[str, Any]]:
        # whole shards consumed before the checkpoint are left out; `skip` rows of the next one are dropped below
        order, skip = self._epoch_order(self.epoch), self.consumed
        while order and skip >= order[0][1]:
            skip -= order.pop(0)[1]
        files = [uri for uri, _ in order]
        if not files:  # the checkpoint was taken exactly at the end of an epoch
            return
        buffer: list[dict[str, np.ndarray]] = []
        buffered = 0
        for chunk in self._read(files, max(self.batch_size, 64)):
            if skip:  # rows of a partly consumed shard, already used before the checkpoint
                drop = min(skip, len(chunk["noise"]))
                chunk = {k: v[drop:] for k, v in chunk.items()}
                skip -= drop
            buffer.append(chunk)
            buffered += len(chunk["noise"])
            while buffered >= self.batch_size:
                merged = {k: np.concatenate([c[k] for c in buffer]) for k in buffer[0]}
                batch = {k: v[: self.batch_size] for k, v in merged.items()}
                rest = {k: v[self.batch_size :] for k, v in merged.items()}
                buffer, buffered = [rest], buffered - self.batch_size
                yield {
                    "prompt": [str(p) for p in batch["prompt"]],
                    "noise": torch.from_numpy(np.ascontiguousarray(batch["noise"])),
                    "target": torch.from_numpy(np.ascontiguousarray(batch["target"])),
                }

    def _read(self, files: list[str], chunk_size: int) -> Iterator[dict[str, np.ndarray]]:
        """`self.read`, or the shards' rows kept from an earlier pass (one chunk per shard)."""
        if self._kept is not None and all(f in self._kept for f in files):
            yield from (self._kept[f] for f in files)
            return
        rows = dict(self.mine)
        pending, parts, have = list(files), [], 0  # the shard being read, its chunks so far, their rows
        for chunk in self.read(files, chunk_size):
            yield chunk
            while self._kept is not None and pending and len(chunk["noise"]):
                take = min(rows[pending[0]] - have, len(chunk["noise"]))
                parts.append({k: v[:take] for k, v in chunk.items()})
                chunk, have = {k: v[take:] for k, v in chunk.items()}, have + take
                if have == rows[pending[0]]:
                    self._kept[pending.pop(0)] = {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}
                    parts, have = [], 0
                    if sum(v.nbytes for shard in self._kept.values() for v in shard.values()) > self.memory_bytes:
                        self._kept = None  # too large to keep: every pass reads

    def __iter__(self) -> "PairStream":
        return self

    def close(self) -> None:
        """Stops the Ray Data read in flight (call before Ray shuts down)."""
        if self._batches is not None:
            self._batches.close()
            self._batches = None

    def __next__(self) -> dict[str, Any]:
        while True:
            if self._batches is None:
                self._batches = self._epoch_batches()
            batch = next(self._batches, None)
            if batch is not None:
                self.consumed += self.batch_size
                return batch
            self.epoch, self.consumed, self._batches = self.epoch + 1, 0, None
