"""Prompt files: one prompt per line (.txt), or a "prompt" column (.csv, .jsonl, .parquet); local or s3://."""
from __future__ import annotations

import hashlib
import io
import os

from dmd_ray import ASSETS
from dmd_ray.data import storage
from dmd_ray.typed_config import ConfigError


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
                raise ConfigError(f"unsupported prompt file type {name!r}: use .txt, .csv, .jsonl or .parquet")
            column = "prompt" if "prompt" in table.column_names else None
            if column is None:
                raise ConfigError(f"prompt file {uri!r} has no 'prompt' column (columns: {table.column_names})")
            prompts = [str(p).strip() if p is not None else "" for p in table.column(column).to_pylist()]
    except UnicodeDecodeError:
        raise ConfigError(f"prompt file {uri!r} is not UTF-8 text") from None
    except Exception as e:
        if isinstance(e, ConfigError):
            raise
        raise ConfigError(f"cannot read prompt file {uri!r}: {e}") from None
    prompts = [p for p in prompts if p]
    if not prompts:
        raise ConfigError(f"prompt file {uri!r} holds no prompts")
    return prompts


def prompts_fingerprint(prompts: list[str]) -> str:
    return hashlib.sha256("\n".join(prompts).encode()).hexdigest()[:16]


# The shapes domain's 180 fully specified prompts (dmd_ray.demos.shapes.evaluation_prompts(), in that order; a test
# keeps the two equal): the prompt set of distillation runs given no prompt file.
BUILTIN_PROMPTS = os.path.join(ASSETS, "shapes_prompts.txt")
