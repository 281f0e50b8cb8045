"""Evaluate generators on the shapes domain: Ray Data batch inference over the evaluation prompts, then FID, KID,
prompt accuracy and LPIPS diversity, and a comparison grid (same prompts and seeds in every row).

    python jobs/evaluate.py --model runs/distill-demo/export --num-samples 1000 --output runs/eval
    python jobs/evaluate.py --model teacher:demo,teacher-onestep:demo,runs/d/export,runs/no_reg/export --output runs/eval

A model is an exported generator (built-in name, local folder or s3://, run in one step), `teacher:SPEC` (the
teacher's guided ODE sampler: --sampler, --steps, --guidance-scale) or `teacher-onestep:SPEC` (the teacher's network
once at t = T-1, read as x0, guided: what DMD starts from). Sample i has prompt i mod 180 of the evaluation set and
seed --seed + i, whatever the model, so rows of the grid compare like with like.

FID and KID are computed in the feature space of the shapes classifier (the domain's judge, shipped in the package)
against rendered images of the same prompts: Inception features say little about 32x32 shapes, and their weights are
not available offline. `prompt_accuracy` is the fraction of images whose four attributes the judge reads as the
prompt's. `lpips_diversity` is the mean LPIPS between two images of the same prompt (seeds i and i + 180; random
AlexNet backbone with the package's calibrated heads, offline): 0 is a collapsed generator.
"""
from __future__ import annotations

import dataclasses
import json
import os
import re
import sys
import time
from dataclasses import dataclass

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)  # the repo root, for `ray job submit --working-dir .`

from dmd_ray import shapes, storage  # noqa: E402
from dmd_ray.config import parse_args  # noqa: E402
from dmd_ray.evaluation import ImageMaker, metrics  # noqa: E402


@dataclass
class EvalConfig:
    """Config of `jobs/evaluate.py` (every key can be set in YAML or as --key-name on the command line)."""

    model: str = "teacher:demo"  # comma-separated model specs (see the module docstring)
    output: str = "runs/eval"  # local folder or s3://: metrics.json and grid.png
    num_samples: int = 1000
    seed: int = 0
    sampler: str = "pndm"  # for teacher: models
    steps: int = 50
    guidance_scale: float = 3.0  # for teacher: and teacher-onestep: models (generators run unguided)
    batch_size: int = 128
    num_actors: int = 1
    gpus_per_actor: float = -1.0  # -1: 1 when the cluster has GPUs, else 0
    grid_columns: int = 8

    def models(self) -> list[str]:
        return [m.strip() for m in self.model.split(",") if m.strip()]

    def check(self) -> None:
        problems = []
        if not self.models():
            problems.append("model is empty")
        if self.num_samples < 2:
            problems.append(f"num_samples must be >= 2, got {self.num_samples}")
        if self.batch_size < 1 or self.num_actors < 1:
            problems.append("batch_size and num_actors must be >= 1")
        if problems:
            raise ValueError("; ".join(problems))


def log(msg: str) -> None:
    print(f"[evaluate {time.strftime('%H:%M:%S')}] {msg}", flush=True)


def sample_rows(cfg: EvalConfig) -> list[dict]:
    prompts = shapes.evaluation_prompts()
    return [{"prompt": prompts[i % len(prompts)], "seed": cfg.seed + i} for i in range(cfg.num_samples)]


def generate(spec: str, cfg: EvalConfig) -> tuple[np.ndarray, list[str]]:
    """All samples of one model through a Ray Data actor pool; returned in row order."""
    import ray.data

    from dmd_ray.ray_utils import cluster_gpus

    gpus = cfg.gpus_per_actor if cfg.gpus_per_actor >= 0 else (1.0 if cluster_gpus() > 0 else 0.0)
    ds = ray.data.from_items(sample_rows(cfg)).map_batches(
        ImageMaker,  # from dmd_ray.evaluation: importable on every worker
        fn_constructor_kwargs={"spec": spec, "cfg": dataclasses.asdict(cfg)},
        batch_size=cfg.batch_size,
        compute=ray.data.ActorPoolStrategy(size=cfg.num_actors),
        num_gpus=gpus,
        num_cpus=1 if gpus else 0.5,  # fractional on CPU: the read tasks must find a slot beside the actors
    )
    rows = sorted(ds.take_all(), key=lambda r: r["seed"])
    return np.stack([r["image"] for r in rows]), [r["prompt"] for r in rows]


def run(cfg: EvalConfig) -> dict:
    import torch

    from dmd_ray.images import grid, png_bytes

    cfg.check()
    # the actors run in another directory: local model folders become absolute paths here
    specs = [kind + storage.absolute(rest, only_if_exists=True) for kind, rest in
             (re.match(r"^((?:teacher|teacher-onestep):)?(.*)$", m).groups("") for m in cfg.models())]
    cfg = dataclasses.replace(cfg, model=",".join(specs), output=storage.absolute(cfg.output))
    storage.check_access(cfg.output)
    judge = shapes.load_classifier()
    rows = sample_rows(cfg)
    real = ((shapes.render([shapes.parse_prompt(r["prompt"]) for r in rows], seed=cfg.seed + 10**6) + 1) * 127.5).round().to(torch.uint8)
    results, grid_rows = {}, []
    for spec in cfg.models():
        start = time.perf_counter()
        images, prompts = generate(spec, cfg)
        results[spec] = {**metrics(images, prompts, judge, real), "seconds": round(time.perf_counter() - start, 1)}
        log(f"{spec}: " + ", ".join(f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}" for k, v in results[spec].items()))
        grid_rows.append(images[: cfg.grid_columns])
    real_row = real[: cfg.grid_columns].permute(0, 2, 3, 1).numpy()
    summary = {"models": results, "rows_of_grid": ["rendered (a real image of each prompt)", *cfg.models()],
               "columns_of_grid": [r["prompt"] for r in rows[: cfg.grid_columns]], "config": cfg.__dict__}
    storage.write_bytes(storage.join(cfg.output, "metrics.json"), json.dumps(summary, indent=1).encode())
    storage.write_bytes(storage.join(cfg.output, "grid.png"), png_bytes(grid(np.concatenate([real_row, *grid_rows]), cfg.grid_columns), 64 * cfg.grid_columns))
    log(f"metrics at {storage.join(cfg.output, 'metrics.json')}, grid at {storage.join(cfg.output, 'grid.png')}")
    return summary


def main(argv: list[str] | None = None) -> int:
    from dmd_ray.ray_utils import init_ray

    cfg = parse_args(EvalConfig, argv, description=__doc__.split("\n\n")[0])
    try:
        cfg.check()
    except ValueError as e:
        print(f"evaluate: error: {e}", file=sys.stderr)
        return 2
    init_ray()
    try:
        run(cfg)
    except (ValueError, FileNotFoundError, storage.StorageError) as e:
        print(f"evaluate: error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
