"""(noise, teacher output) pairs for DMD's regression loss: config, Parquet contract, sampling, reading.

A pairs dataset is a folder or S3 prefix holding

    manifest.json           the generating config and the completed shards (a summary; shards are the truth)
    shard-000000.parquet    pairs [0, S), then [S, 2S), ... (S = shard_size; the last shard may be shorter)

Each row: index (int64), prompt (string), seed (int64), noise and target (Arrow fixed_shape_tensor float16, the
latent shape), and teacher, sampler, steps, guidance_scale. Pair i uses prompt i mod len(prompts) and noise drawn
on the CPU from seed = pair_seed(base seed, i), so it is the same on any device. Shard k always holds the same
pairs: a rerun writes only the shards that are missing, and a shard appears whole or not at all (local files are
renamed into place; an S3 object is visible only once its upload completes).
"""
from __future__ import annotations

import dataclasses
import hashlib
import io
import json
import os
import re
import time
from dataclasses import dataclass
from typing import Any, Iterator

import numpy as np
import torch

from dmd_ray import storage

MANIFEST = "manifest.json"
FORMAT = "dmd-ray-pairs/1"
SHARD_RE = re.compile(r"^shard-(\d{6})\.parquet$")
DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def shard_name(k: int) -> str:
    return f"shard-{k:06d}.parquet"


# ------------------------------------------------------------------------------------------------ config
@dataclass
class PairsConfig:
    """Config of `jobs/generate_pairs.py` (every key can be set in YAML or as --key-name on the command line)."""

    teacher: str = "tiny"  # built-in name, local diffusers folder, s3:// URI or hub id
    prompts: str = ""  # .txt (one per line), .csv/.jsonl/.parquet (a "prompt" column); local or s3://
    num_pairs: int = 1024
    out: str = "runs/pairs"  # local folder or s3://bucket/prefix
    sampler: str = "pndm"  # DMD used 50 PNDM steps with guidance 3 for SD 1.5
    steps: int = 50
    guidance_scale: float = 3.0
    resolution: int = 0  # pixels; 0: the teacher's default
    dtype: str = "auto"  # float16 on GPU, float32 on CPU; or float32 / float16 / bfloat16
    seed: int = 0
    shard_size: int = 256
    batch_size: int = 16  # pairs per sampler call inside an actor
    num_actors: int = 0  # 0: one per GPU (or 1 on a machine without GPUs)
    gpus_per_actor: float = -1.0  # -1: 1 when the cluster has GPUs, else 0
    cpus_per_actor: float = 1.0
    compile: bool = False  # torch.compile the UNet (GPU)
    cache_dir: str = ""  # where s3:// teachers are cached; default ~/.cache/dmd_ray/teachers

    def validate(self) -> None:
        from dmd_ray.sampling import SAMPLERS

        problems = []
        if not self.prompts:
            problems.append("prompts is required (a .txt/.csv/.jsonl/.parquet file, local or s3://)")
        if self.num_pairs <= 0:
            problems.append(f"num_pairs must be positive, got {self.num_pairs}")
        if self.shard_size <= 0:
            problems.append(f"shard_size must be positive, got {self.shard_size}")
        if self.batch_size <= 0:
            problems.append(f"batch_size must be positive, got {self.batch_size}")
        if self.steps <= 0:
            problems.append(f"steps must be positive, got {self.steps}")
        if self.sampler not in SAMPLERS:
            problems.append(f"sampler must be one of {sorted(SAMPLERS)}, got {self.sampler!r}")
        if self.dtype not in ("auto", *DTYPES):
            problems.append(f"dtype must be auto, float32, float16 or bfloat16, got {self.dtype!r}")
        if self.resolution < 0:
            problems.append(f"resolution must be positive (or 0 for the teacher's default), got {self.resolution}")
        if self.guidance_scale < 1.0:
            problems.append(f"guidance_scale must be >= 1 (1 disables guidance), got {self.guidance_scale}")
        if problems:
            raise ValueError("; ".join(problems))

    @property
    def num_shards(self) -> int:
        return -(-self.num_pairs // self.shard_size)

    def shard_range(self, k: int) -> range:
        return range(k * self.shard_size, min((k + 1) * self.shard_size, self.num_pairs))


def resolve_dtype(name: str, device: torch.device | str) -> torch.dtype:
    if name == "auto":
        return torch.float16 if torch.device(device).type == "cuda" else torch.float32
    return DTYPES[name]


# ------------------------------------------------------------------------------------------------ prompts
def read_prompts(uri: str) -> list[str]:
    """Prompts from a text file (one per line), CSV, JSONL/JSON lines or Parquet (column "prompt"), local or S3."""
    import pyarrow.csv as pcsv
    import pyarrow.json as pjson
    import pyarrow.parquet as pq

    if not storage.exists(uri):
        raise FileNotFoundError(f"prompt file {uri!r} does not exist")
    data = storage.read_bytes(uri)
    name = uri.lower().rsplit("/", 1)[-1]
    try:
        if name.endswith((".txt", ".text")) or "." not in name:
            prompts = [line.strip() for line in data.decode("utf-8").splitlines()]
        else:
            if name.endswith(".csv"):
                table = pcsv.read_csv(io.BytesIO(data))
            elif name.endswith((".jsonl", ".json", ".ndjson")):
                table = pjson.read_json(io.BytesIO(data))
            elif name.endswith(".parquet"):
                table = pq.read_table(io.BytesIO(data))
            else:
                raise ValueError(f"unsupported prompt file type {name!r}: use .txt, .csv, .jsonl or .parquet")
            column = "prompt" if "prompt" in table.column_names else None
            if column is None:
                raise ValueError(f"prompt file {uri!r} has no 'prompt' column (columns: {table.column_names})")
            prompts = [str(p).strip() if p is not None else "" for p in table.column(column).to_pylist()]
    except UnicodeDecodeError:
        raise ValueError(f"prompt file {uri!r} is not UTF-8 text") from None
    except Exception as e:
        if isinstance(e, ValueError) and "prompt" in str(e):
            raise
        raise ValueError(f"cannot read prompt file {uri!r}: {e}") from None
    prompts = [p for p in prompts if p]
    if not prompts:
        raise ValueError(f"prompt file {uri!r} holds no prompts")
    return prompts


def prompts_fingerprint(prompts: list[str]) -> str:
    return hashlib.sha256("\n".join(prompts).encode()).hexdigest()[:16]


# ------------------------------------------------------------------------------------------------ noise
def pair_seed(base_seed: int, index: int) -> int:
    """A 63-bit seed that depends only on (base seed, pair index)."""
    hi, lo = np.random.SeedSequence([int(base_seed), int(index)]).generate_state(2, dtype=np.uint32)
    return int((int(hi) << 32 | int(lo)) & (2**63 - 1))


def pair_noise(seed: int, shape: tuple[int, ...]) -> torch.Tensor:
    """Standard normal noise from a CPU generator: identical on every machine and device."""
    return torch.randn(shape, generator=torch.Generator("cpu").manual_seed(seed), dtype=torch.float32)


# ------------------------------------------------------------------------------------------------ manifest
def manifest_config(cfg: PairsConfig, latent_shape: tuple[int, ...], resolution: int, dtype: torch.dtype, prompts: list[str]) -> dict:
    """What makes two runs' pairs interchangeable; a rerun must match it exactly."""
    return {
        "teacher": cfg.teacher,
        "sampler": cfg.sampler,
        "steps": cfg.steps,
        "guidance_scale": cfg.guidance_scale,
        "resolution": resolution,
        "latent_shape": list(latent_shape),
        "dtype": str(dtype).replace("torch.", ""),
        "seed": cfg.seed,
        "shard_size": cfg.shard_size,
        "num_pairs": cfg.num_pairs,
        "num_prompts": len(prompts),
        "prompts_sha256": prompts_fingerprint(prompts),
    }


def load_manifest(uri: str) -> dict | None:
    path = storage.join(uri, MANIFEST)
    if not storage.exists(path):
        return None
    manifest = json.loads(storage.read_bytes(path))
    if manifest.get("format") != FORMAT:
        raise ValueError(f"{path} is not a dmd-ray pairs manifest (format {manifest.get('format')!r})")
    return manifest


def write_manifest(uri: str, config: dict, completed: list[int], extra: dict | None = None) -> None:
    manifest = {"format": FORMAT, "config": config, "num_shards": -(-config["num_pairs"] // config["shard_size"]), "completed_shards": sorted(completed)}
    manifest.update(extra or {})
    storage.write_bytes(storage.join(uri, MANIFEST), json.dumps(manifest, indent=1).encode())


def completed_shards(uri: str) -> list[int]:
    return sorted(int(m.group(1)) for name in storage.list_files(uri) if (m := SHARD_RE.match(name)))


def check_output(uri: str, config: dict) -> list[int]:
    """The shards already done under `uri`; raises if it holds pairs of another teacher or config."""
    done = completed_shards(uri)
    manifest = load_manifest(uri)
    if manifest is None:
        if done:
            raise ValueError(f"{uri} holds {len(done)} pair shards but no {MANIFEST}: their config is unknown; use another output")
        return []
    theirs = manifest["config"]
    diff = {k: (theirs.get(k), v) for k, v in config.items() if theirs.get(k) != v}
    if diff:
        listed = ", ".join(f"{k}: {a!r} there, {b!r} now" for k, (a, b) in sorted(diff.items()))
        raise ValueError(f"{uri} holds pairs made with another teacher or config ({listed}); use another output or the same config")
    return [k for k in done if k < manifest["num_shards"]]


# ------------------------------------------------------------------------------------------------ sampling
class PairSampler:
    """The teacher's guided ODE sampler on (prompt, seed) batches: returns (noise, target) latents."""

    def __init__(self, teacher, sampler: str, steps: int, guidance_scale: float, resolution: int, device: torch.device, dtype: torch.dtype, compile: bool = False):
        from dmd_ray.denoiser import GuidedDenoiser
        from dmd_ray.sampling import make_scheduler

        self.teacher = teacher.to(device=device, dtype=dtype)
        self.latent_shape = teacher.latent_shape(resolution)
        self.scheduler = make_scheduler(sampler, teacher.scheduler)
        self.steps, self.device, self.dtype = steps, device, dtype
        net = teacher.denoiser()
        if compile:
            net = torch.compile(net)
        uncond = teacher.uncond_embedding() if guidance_scale != 1.0 else None
        self.denoiser = GuidedDenoiser(net, guidance_scale, uncond)

    @torch.inference_mode()
    def __call__(self, prompts: list[str], seeds: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
        from dmd_ray.sampling import ode_sample

        noise = torch.stack([pair_noise(s, self.latent_shape) for s in seeds])
        cond = self.teacher.encode_prompts(prompts).to(self.device, self.dtype)
        x = ode_sample(self.denoiser, self.scheduler, noise.to(self.device, self.dtype), cond, self.steps)
        return noise, x.float().cpu()


def _tensor_column(x: np.ndarray):
    import pyarrow as pa

    return pa.FixedShapeTensorArray.from_numpy_ndarray(np.ascontiguousarray(x.astype(np.float16)))


class ShardWriter:
    """Makes and writes whole shards; a callable class for Ray Data's map_batches (one row = one shard index).

    Plain Python: it runs the same in a Ray actor, a plain loop or a test.
    """

    def __init__(self, cfg: dict, prompts: list[str], device: str | None = None, threads: int | None = None):
        from dmd_ray.models import load_teacher

        self.cfg = PairsConfig(**cfg)
        self.prompts = prompts
        if threads:
            torch.set_num_threads(max(1, threads))
        self.device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        dtype = resolve_dtype(self.cfg.dtype, self.device)
        teacher = load_teacher(self.cfg.teacher, cache_dir=self.cfg.cache_dir or None)
        resolution = self.cfg.resolution or teacher.default_resolution
        self.sampler = PairSampler(teacher, self.cfg.sampler, self.cfg.steps, self.cfg.guidance_scale, resolution, self.device, dtype, self.cfg.compile)

    def make_shard(self, k: int):
        import pyarrow as pa

        indices = list(self.cfg.shard_range(k))
        noises, targets = [], []
        for start in range(0, len(indices), self.cfg.batch_size):
            chunk = indices[start : start + self.cfg.batch_size]
            noise, target = self.sampler([self.prompts[i % len(self.prompts)] for i in chunk], [pair_seed(self.cfg.seed, i) for i in chunk])
            noises.append(noise.numpy())
            targets.append(target.numpy())
        n = len(indices)
        return pa.table(
            {
                "index": pa.array(indices, pa.int64()),
                "prompt": pa.array([self.prompts[i % len(self.prompts)] for i in indices], pa.string()),
                "seed": pa.array([pair_seed(self.cfg.seed, i) for i in indices], pa.int64()),
                "noise": _tensor_column(np.concatenate(noises)),
                "target": _tensor_column(np.concatenate(targets)),
                "teacher": pa.array([self.cfg.teacher] * n, pa.string()),
                "sampler": pa.array([self.cfg.sampler] * n, pa.string()),
                "steps": pa.array([self.cfg.steps] * n, pa.int32()),
                "guidance_scale": pa.array([self.cfg.guidance_scale] * n, pa.float32()),
            }
        )

    def write_shard(self, k: int) -> int:
        import pyarrow.parquet as pq

        table = self.make_shard(k)

        def _write(fs, path):
            with fs.open_output_stream(path) as f:
                pq.write_table(table, f)

        storage.write_atomic(storage.join(self.cfg.out, shard_name(k)), _write)
        return table.num_rows

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        shards, rows, seconds = [], [], []
        for k in batch["shard"]:
            started = time.perf_counter()
            rows.append(self.write_shard(int(k)))
            shards.append(int(k))
            seconds.append(time.perf_counter() - started)
        return {"shard": np.array(shards), "rows": np.array(rows), "seconds": np.array(seconds)}


# ------------------------------------------------------------------------------------------------ reading
def shard_uris(uri: str, require_complete: bool = True) -> list[str]:
    """The shard files of a pairs dataset; by default all shards its manifest announces must be present."""
    manifest = load_manifest(uri)
    if manifest is None:
        raise FileNotFoundError(f"no pairs dataset at {uri} (no {MANIFEST})")
    done = completed_shards(uri)
    missing = sorted(set(range(manifest["num_shards"])) - set(done))
    if require_complete and missing:
        raise ValueError(f"pairs dataset {uri} is incomplete: {len(missing)} of {manifest['num_shards']} shards missing (rerun generate_pairs)")
    return [storage.join(uri, shard_name(k)) for k in done if k < manifest["num_shards"]]


def _table_to_torch(table) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for name in table.column_names:
        col = table.column(name).combine_chunks()
        if hasattr(col, "to_numpy_ndarray"):
            out[name] = torch.from_numpy(col.to_numpy_ndarray().copy())
        elif name in ("prompt", "teacher", "sampler"):
            out[name] = col.to_pylist()
        else:
            out[name] = torch.from_numpy(col.to_numpy(zero_copy_only=False).copy())
    return out


def iter_pairs(uri: str, batch_size: int = 64, columns: list[str] | None = None) -> Iterator[dict[str, Any]]:
    """Plain iteration over a pairs dataset (local or S3), in index order, as torch tensors and lists of strings."""
    import pyarrow.parquet as pq

    for shard in shard_uris(uri):
        fs, path = storage.resolve(shard)
        with fs.open_input_file(path) as f:
            for batch in pq.ParquetFile(f).iter_batches(batch_size=batch_size, columns=columns):
                import pyarrow as pa

                yield _table_to_torch(pa.Table.from_batches([batch]))


def ray_dataset(uri: str, columns: list[str] | None = None):
    """The pairs as a Ray Dataset (tensor columns come back as ndarrays), read through the same filesystem."""
    import ray.data

    shards = shard_uris(uri)
    fs, _ = storage.resolve(uri)
    paths = [storage.resolve(s)[1] for s in shards]
    return ray.data.read_parquet(paths, filesystem=fs, columns=columns, shuffle=None)


def config_dict(cfg: PairsConfig) -> dict:
    return dataclasses.asdict(cfg)


def local_threads() -> int:
    return max(1, (os.cpu_count() or 1))


class PairStream:
    """Endless batches of pairs for one of `world` workers, in an order that can be replayed exactly.

    The worker owns shards k with k % world == rank; each epoch visits them in an order drawn from (seed, rank,
    epoch) and reads them through Ray Data (read_parquet with preserve_order), rows in file order. `state()` is
    (epoch, rows consumed in the epoch); a stream built from it continues with exactly the next batch. Batches never
    straddle epochs (the short tail of an epoch is dropped).
    """

    def __init__(self, uri: str, batch_size: int, rank: int, world: int, seed: int, state: dict | None = None):
        manifest = load_manifest(uri)
        shards = shard_uris(uri)
        cfg = manifest["config"]
        sizes = [len(range(k * cfg["shard_size"], min((k + 1) * cfg["shard_size"], cfg["num_pairs"]))) for k in range(len(shards))]
        self.mine = [(shards[k], sizes[k]) for k in range(len(shards)) if k % world == rank]
        if not self.mine:
            raise ValueError(f"pairs {uri} have {len(shards)} shards: none for worker {rank} of {world}")
        per_epoch = sum(n for _, n in self.mine)
        if per_epoch < batch_size:
            raise ValueError(f"worker {rank} of {world} has {per_epoch} pairs, fewer than its batch of {batch_size}")
        self.uri, self.batch_size, self.rank, self.seed = uri, batch_size, rank, seed
        self.epoch = int((state or {}).get("epoch", 0))
        self.consumed = int((state or {}).get("consumed", 0))
        self._batches: Iterator[dict[str, Any]] | None = None

    def state(self) -> dict:
        return {"epoch": self.epoch, "consumed": self.consumed}

    def _epoch_order(self, epoch: int) -> list[tuple[str, int]]:
        order = np.random.default_rng([self.seed, self.rank, epoch]).permutation(len(self.mine))
        return [self.mine[i] for i in order]

    def _epoch_batches(self) -> Iterator[dict[str, Any]]:
        import ray.data

        files, skip = [], self.consumed
        for uri, n in self._epoch_order(self.epoch):
            if skip >= n:
                skip -= n
                continue
            files.append(uri)
        if not files:  # the checkpoint was taken exactly at the end of an epoch
            return
        fs, _ = storage.resolve(self.uri)
        ds = ray.data.read_parquet([storage.resolve(f)[1] for f in files], filesystem=fs, columns=["prompt", "noise", "target"], shuffle=None, num_cpus=0.25)
        buffer: list[dict[str, np.ndarray]] = []
        buffered = 0
        for chunk in ds.iter_batches(batch_size=max(self.batch_size, 64), batch_format="numpy"):
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
