"""(noise, teacher output) pairs for DMD's regression loss: the Parquet contract, manifest, writer and readers.

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

import json
import re
from dataclasses import dataclass
from typing import Any, Callable, Iterator

import numpy as np
import torch

from dmd_ray.data import storage
from dmd_ray.data.prompts import prompts_fingerprint
from dmd_ray.typed_config import ConfigError

MANIFEST = "manifest.json"
FORMAT = "dmd-ray-pairs/1"
SHARD_RE = re.compile(r"^shard-(\d{6})\.parquet$")


def shard_name(k: int) -> str:
    return f"shard-{k:06d}.parquet"


def pair_seed(base_seed: int, index: int) -> int:
    """A 63-bit seed that depends only on (base seed, pair index)."""
    hi, lo = np.random.SeedSequence([int(base_seed), int(index)]).generate_state(2, dtype=np.uint32)
    return int((int(hi) << 32 | int(lo)) & (2**63 - 1))


@dataclass(frozen=True)
class ShardLayout:
    """num_pairs pairs in shards of shard_size: shard k holds pairs [k * S, (k + 1) * S) (the last may be shorter)."""

    num_pairs: int
    shard_size: int

    @property
    def num_shards(self) -> int:
        return -(-self.num_pairs // self.shard_size)

    def shard_range(self, k: int) -> range:
        return range(k * self.shard_size, min((k + 1) * self.shard_size, self.num_pairs))


# ------------------------------------------------------------------------------------------------ manifest
def manifest_config(*, teacher: str, sampler: str, steps: int, guidance_scale: float, resolution: int, latent_shape, dtype: torch.dtype,
                    seed: int, layout: ShardLayout, prompts: list[str]) -> dict:
    """What makes two runs' pairs interchangeable; a rerun must match it exactly."""
    return {
        "teacher": teacher,
        "sampler": sampler,
        "steps": steps,
        "guidance_scale": guidance_scale,
        "resolution": resolution,
        "latent_shape": list(latent_shape),
        "dtype": str(dtype).replace("torch.", ""),
        "seed": seed,
        "shard_size": layout.shard_size,
        "num_pairs": layout.num_pairs,
        "num_prompts": len(prompts),
        "prompts_sha256": prompts_fingerprint(prompts),
    }


def load_manifest(uri: str) -> dict | None:
    path = storage.join(uri, MANIFEST)
    if not storage.exists(path):
        return None
    manifest = json.loads(storage.read_bytes(path))
    if manifest.get("format") != FORMAT:
        raise ConfigError(f"{path} is not a dmd-ray pairs manifest (format {manifest.get('format')!r})")
    return manifest


def write_manifest(uri: str, config: dict, completed: list[int], extra: dict | None = None) -> None:
    manifest = {"format": FORMAT, "config": config, "num_shards": -(-config["num_pairs"] // config["shard_size"]), "completed_shards": sorted(completed)}
    manifest.update(extra or {})
    storage.write_bytes(storage.join(uri, MANIFEST), json.dumps(manifest, indent=1).encode())


def completed_shards(uri: str) -> list[int]:
    return sorted(int(m.group(1)) for name in storage.list_files(uri) if (m := SHARD_RE.match(name)))


def differences(theirs: dict, ours: dict) -> str:
    """The keys of `ours` whose value differs in a manifest's config `theirs`, in words ("" when none do)."""
    diff = {k: (theirs.get(k), v) for k, v in ours.items() if theirs.get(k) != v}
    return ", ".join(f"{k}: {a!r} there, {b!r} now" for k, (a, b) in sorted(diff.items()))


def check_output(uri: str, config: dict) -> list[int]:
    """The shards already done under `uri`; raises if it holds pairs of another teacher or config."""
    done = completed_shards(uri)
    manifest = load_manifest(uri)
    if manifest is None:
        if done:
            raise ConfigError(f"{uri} holds {len(done)} pair shards but no {MANIFEST}: their config is unknown; use another output")
        return []
    listed = differences(manifest["config"], config)
    if listed:
        raise ConfigError(f"{uri} holds pairs made with another teacher or config ({listed}); use another output or the same config")
    return [k for k in done if k < manifest["num_shards"]]


# ------------------------------------------------------------------------------------------------ writing
def _tensor_column(x: np.ndarray):
    import pyarrow as pa

    return pa.FixedShapeTensorArray.from_numpy_ndarray(np.ascontiguousarray(x.astype(np.float16)))


PairMaker = Callable[[list[str], list[int]], tuple[torch.Tensor, torch.Tensor]]  # (prompts, seeds) -> (noise, target)


class ShardWriter:
    """Makes and writes whole shards with `make_pairs` (the teacher's sampler); `provenance` holds the constant
    columns (teacher, sampler, steps, guidance_scale). Plain Python: the same in a Ray actor, a loop or a test."""

    def __init__(self, out: str, layout: ShardLayout, prompts: list[str], seed: int, make_pairs: PairMaker, batch_size: int, provenance: dict):
        self.out, self.layout, self.prompts, self.seed = out, layout, prompts, seed
        self.make_pairs, self.batch_size, self.provenance = make_pairs, batch_size, provenance

    def make_shard(self, k: int):
        import pyarrow as pa

        indices = list(self.layout.shard_range(k))
        prompts = [self.prompts[i % len(self.prompts)] for i in indices]
        seeds = [pair_seed(self.seed, i) for i in indices]
        noises, targets = [], []
        for start in range(0, len(indices), self.batch_size):
            noise, target = self.make_pairs(prompts[start : start + self.batch_size], seeds[start : start + self.batch_size])
            noises.append(noise.numpy())
            targets.append(target.numpy())
        n = len(indices)
        p = self.provenance
        return pa.table(
            {
                "index": pa.array(indices, pa.int64()),
                "prompt": pa.array(prompts, pa.string()),
                "seed": pa.array(seeds, pa.int64()),
                "noise": _tensor_column(np.concatenate(noises)),
                "target": _tensor_column(np.concatenate(targets)),
                "teacher": pa.array([p["teacher"]] * n, pa.string()),
                "sampler": pa.array([p["sampler"]] * n, pa.string()),
                "steps": pa.array([p["steps"]] * n, pa.int32()),
                "guidance_scale": pa.array([p["guidance_scale"]] * n, pa.float32()),
            }
        )

    def write_shard(self, k: int) -> int:
        import pyarrow.parquet as pq

        table = self.make_shard(k)

        def _write(fs, path):
            with fs.open_output_stream(path) as f:
                pq.write_table(table, f)

        storage.write_atomic(storage.join(self.out, shard_name(k)), _write)
        return table.num_rows


# ------------------------------------------------------------------------------------------------ reading
def shard_uris(uri: str, require_complete: bool = True) -> list[str]:
    """The shard files of a pairs dataset; by default all shards its manifest announces must be present."""
    manifest = load_manifest(uri)
    if manifest is None:
        raise FileNotFoundError(f"no pairs dataset at {uri} (no {MANIFEST})")
    done = completed_shards(uri)
    missing = sorted(set(range(manifest["num_shards"])) - set(done))
    if require_complete and missing:
        raise ConfigError(f"pairs dataset {uri} is incomplete: {len(missing)} of {manifest['num_shards']} shards missing (rerun generate_pairs)")
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
    return iter_pairs_files(shard_uris(uri), batch_size, columns)


def iter_pairs_files(shards: list[str], batch_size: int = 64, columns: list[str] | None = None) -> Iterator[dict[str, Any]]:
    """The rows of the given shard files, in that order, in batches of at most `batch_size` (per file)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    for shard in shards:
        fs, path = storage.resolve(shard)
        with fs.open_input_file(path) as f:
            for batch in pq.ParquetFile(f).iter_batches(batch_size=batch_size, columns=columns):
                yield _table_to_torch(pa.Table.from_batches([batch]))
