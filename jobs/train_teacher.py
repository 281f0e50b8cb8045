"""Train a small Stable Diffusion-style teacher on the shapes domain with Ray Train (CPU or GPU).

    python jobs/train_teacher.py --output runs/teacher                      # a teacher from scratch (GPU)
    python jobs/train_teacher.py --output runs/t2 --init-from runs/teacher/teacher --time-limit-minutes 7   # train it on
    python jobs/train_teacher.py --output runs/t --vae-steps 20 --unet-steps 20   # a smoke run on CPU
    ray job submit --working-dir . -- python jobs/train_teacher.py --num-workers 4 --output s3://bucket/teacher

The teacher is SD's five components (tokenizer, CLIP text encoder, UNet2DConditionModel, AutoencoderKL, scheduler)
at a small size (models.build_demo_architecture); see dmd_ray/teacher_training.py for the two training stages.
It lands at <output>/teacher as a diffusers folder (safetensors) that `load_teacher` and `DiffusionPipeline` load.
The packaged `demo` teacher (dmd_ray/assets/demo-teacher) is this job's output after three runs, each going on from
the last; BENCHMARKS.md gives the commands.
Checkpoints go to <output>/<run_name>; a rerun with the same output resumes.
"""
from __future__ import annotations

import dataclasses
import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)  # the repo root, for `ray job submit --working-dir .`

from dmd_ray import storage  # noqa: E402
from dmd_ray.config import parse_args  # noqa: E402
from dmd_ray.teacher_training import TeacherConfig, log, train_loop_per_worker  # noqa: E402


def run(cfg: TeacherConfig):
    import ray.train
    from ray.train.torch import TorchTrainer

    from dmd_ray.ray_utils import cluster_gpus

    cfg.check()
    # the workers run in another directory: local paths become absolute
    cfg = dataclasses.replace(cfg, output=storage.absolute(cfg.output), init_from=storage.absolute(cfg.init_from, only_if_exists=True))
    storage.check_access(cfg.output)
    use_gpu = cfg.use_gpu == "true" or (cfg.use_gpu == "auto" and cluster_gpus() > 0)
    fs = storage.s3_filesystem() if storage.is_s3(cfg.output) else None
    vae = f"VAE from {cfg.init_from}" if cfg.init_from else f"VAE {cfg.vae_steps} steps"
    log(f"training on {cfg.num_workers} worker(s) ({'GPU' if use_gpu else 'CPU'}): {vae}, UNet {cfg.unet_steps} steps, batch {cfg.batch_size}")
    trainer = TorchTrainer(
        train_loop_per_worker,
        train_loop_config=dataclasses.asdict(cfg),
        scaling_config=ray.train.ScalingConfig(num_workers=cfg.num_workers, use_gpu=use_gpu, resources_per_worker={"CPU": cfg.cpus_per_worker, **({"GPU": 1} if use_gpu else {})}),
        run_config=ray.train.RunConfig(name=cfg.run_name, storage_path=storage.resolve(cfg.output)[1], storage_filesystem=fs,
                                       checkpoint_config=ray.train.CheckpointConfig(num_to_keep=1), failure_config=ray.train.FailureConfig(max_failures=2)),
    )
    result = trainer.fit()
    log(f"done: teacher at {storage.join(cfg.output, 'teacher')}")
    return result


def main(argv: list[str] | None = None) -> int:
    from dmd_ray.ray_utils import init_ray

    cfg = parse_args(TeacherConfig, argv, description=__doc__.split("\n\n")[0])
    try:
        cfg.check()
    except ValueError as e:
        print(f"train_teacher: error: {e}", file=sys.stderr)
        return 2
    init_ray()
    try:
        run(cfg)
    except storage.StorageError as e:
        print(f"train_teacher: error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
