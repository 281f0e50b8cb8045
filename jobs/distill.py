"""Distil a diffusion teacher into a one-step generator with DMD: Ray Train workers, two DeepSpeed engines each.

    python jobs/distill.py                                    # the demo, on an embedded local Ray, into runs/distill-demo
    python jobs/distill.py --config my.yaml --max-steps 20000
    ray job submit --working-dir . -- python jobs/distill.py --config my-sd15.yaml --output s3://bucket/run1

Without --pairs, the teacher's ODE pairs are generated first into <output>/pairs (jobs/generate_pairs.py's code).
A rerun with the same --output and --run-name resumes from the latest checkpoint. `--help` lists every key.
"""
from __future__ import annotations

import dataclasses
import os
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)  # the repo root, for `ray job submit --working-dir .`
sys.path.insert(0, os.path.join(ROOT, "jobs"))

from dmd_ray import pairs, storage  # noqa: E402
from dmd_ray.config import ConfigError, load_yaml, parse_args  # noqa: E402
from dmd_ray.models import TeacherNotFoundError  # noqa: E402
from dmd_ray.training import ConfigProblem, DistillConfig, builtin_prompts, check_config, check_storage_and_data, pairs_config  # noqa: E402

DEMO_PRESET = os.path.join(ROOT, "jobs", "presets", "demo.yaml")


def log(msg: str) -> None:
    print(f"[distill {time.strftime('%H:%M:%S')}] {msg}", flush=True)


def prepare(cfg: DistillConfig) -> tuple[list[str], str, dict]:
    """Every check that can fail before workers start. Returns (prompts, prompts URI, facts)."""
    check_config(cfg)
    if cfg.prompts:
        prompts_uri = cfg.prompts
        prompts = pairs.read_prompts(prompts_uri)
    else:
        prompts = builtin_prompts()
        prompts_uri = storage.join(cfg.output, "prompts.txt")
    facts = check_storage_and_data(cfg, prompts)
    if not cfg.prompts:
        storage.write_bytes(prompts_uri, ("\n".join(prompts) + "\n").encode())
    return prompts, prompts_uri, facts


def run(cfg: DistillConfig):
    """Runs the whole job (pairs if needed, distillation, export); returns the Ray Train Result."""
    import ray.train
    from ray.train.torch import TorchTrainer

    from dmd_ray.ray_utils import cluster_gpus
    from dmd_ray.training import train_loop_per_worker

    # Ray Train workers and Ray Data actors run in other directories: every local path becomes absolute here
    cfg = dataclasses.replace(cfg, output=storage.absolute(cfg.output), pairs=storage.absolute(cfg.pairs), prompts=storage.absolute(cfg.prompts),
                              teacher=storage.absolute(cfg.teacher, only_if_exists=True), cache_dir=storage.absolute(cfg.cache_dir))
    prompts, prompts_uri, facts = prepare(cfg)
    if not cfg.pairs:
        import generate_pairs

        log(f"generating {cfg.num_pairs} teacher pairs into {facts['pairs']}")
        generate_pairs.run(pairs_config(cfg, prompts_uri, facts["pairs"]))
    use_gpu = cfg.use_gpu == "true" or (cfg.use_gpu == "auto" and cluster_gpus() > 0)
    if storage.is_s3(cfg.output):
        fs, storage_path = storage.s3_filesystem(), storage.resolve(cfg.output)[1]
    else:
        fs, storage_path = None, storage.resolve(cfg.output)[1]
    log(f"distilling {cfg.teacher} on {cfg.num_workers} worker(s) ({'GPU' if use_gpu else 'CPU'}), ZeRO-{cfg.zero_stage}, {cfg.precision}, {cfg.max_steps} steps")
    trainer = TorchTrainer(
        train_loop_per_worker,
        train_loop_config={"cfg": dataclasses.asdict(cfg), "prompts": prompts, "facts": facts},
        scaling_config=ray.train.ScalingConfig(num_workers=cfg.num_workers, use_gpu=use_gpu, resources_per_worker={"CPU": cfg.cpus_per_worker, **({"GPU": cfg.gpus_per_worker} if use_gpu else {})}),
        run_config=ray.train.RunConfig(
            name=cfg.run_name,
            storage_path=storage_path,
            storage_filesystem=fs,
            failure_config=ray.train.FailureConfig(max_failures=cfg.max_failures),
            checkpoint_config=ray.train.CheckpointConfig(num_to_keep=cfg.keep_checkpoints),
            worker_runtime_env={"env_vars": {"DS_ACCELERATOR": "cpu"}} if not use_gpu else None,
        ),
    )
    result = trainer.fit()
    log(f"done: export at {storage.join(cfg.output, 'export')}")
    log(f"sample grid at {storage.join(cfg.output, 'samples', 'latest.png')}; metrics at {storage.join(cfg.output, 'metrics.jsonl')}")
    return result


def main(argv: list[str] | None = None) -> int:
    from dmd_ray.ray_utils import init_ray

    argv = sys.argv[1:] if argv is None else argv
    defaults = load_yaml(DEMO_PRESET) if not argv else None  # no arguments: the demo
    cfg = parse_args(DistillConfig, argv, description=__doc__.split("\n\n")[0], defaults=defaults)
    try:
        check_config(cfg)
    except ConfigProblem as e:
        print(f"distill: error: {e}", file=sys.stderr)
        return 2
    init_ray()
    try:
        run(cfg)
    except (ConfigProblem, ConfigError, TeacherNotFoundError, FileNotFoundError, storage.StorageError) as e:
        print(f"distill: error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
