"""Train a small Stable Diffusion-style teacher on the shapes domain with Ray Train (CPU or GPU).

    python jobs/train_teacher.py --output runs/teacher                      # a teacher from scratch (GPU)
    python jobs/train_teacher.py --output runs/t2 --init-from runs/teacher/teacher --time-limit-minutes 7   # train it on
    python jobs/train_teacher.py --output runs/t --vae-steps 20 --unet-steps 20   # a smoke run on CPU
    ray job submit --working-dir . -- python jobs/train_teacher.py --num-workers 4 --output s3://bucket/teacher

The teacher is SD's five components (tokenizer, CLIP text encoder, UNet2DConditionModel, AutoencoderKL, scheduler)
at a small size (dmd_ray.sd.architectures.build_demo_architecture); dmd_ray/demos/teacher_training.py has the two
training stages. It lands at <output>/teacher as a diffusers folder (safetensors) that `load_teacher` and
`DiffusionPipeline` load. The packaged `demo` teacher (dmd_ray/assets/demo-teacher) is this job's output after
three runs, each going on from the last; BENCHMARKS.md gives the commands. Checkpoints go to <output>/<run_name>;
a rerun with the same output resumes.
"""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # the repo root, for `ray job submit --working-dir .`

from dmd_ray.config import TeacherConfig, cli_main  # noqa: E402
from dmd_ray.demos.teacher_training import train_teacher  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    return cli_main("train_teacher", TeacherConfig, train_teacher, argv, __doc__.split("\n\n")[0])


if __name__ == "__main__":
    sys.exit(main())
