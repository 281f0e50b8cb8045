"""Distil a diffusion teacher into a one-step generator with DMD: Ray Train workers, two DeepSpeed engines each.

    python jobs/distill.py                                    # the demo, on an embedded local Ray, into runs/distill-demo
    python jobs/distill.py --config my.yaml --max-steps 20000
    ray job submit --working-dir . -- python jobs/distill.py --config my-sd15.yaml --output s3://bucket/run1

Without --pairs, the teacher's ODE pairs are generated first into <output>/pairs (as jobs/generate_pairs.py does).
A rerun with the same --output and --run-name resumes from the latest checkpoint. `--help` lists every key.
"""
import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)  # the repo root, for `ray job submit --working-dir .`

from dmd_ray.config import DistillConfig, cli_main  # noqa: E402
from dmd_ray.distributed.distill_driver import distill  # noqa: E402
from dmd_ray.typed_config import ConfigError, load_yaml  # noqa: E402

DEMO_PRESET = os.path.join(ROOT, "jobs", "presets", "demo.yaml")


def run(cfg: DistillConfig):
    """The job, with the shapes judge as its in-training probe when --eval-every asks for one, and the shapes
    renderer as the GAN's real images when --gan-real renders does."""
    probe = None
    if cfg.eval_every:
        from dmd_ray.data.prompts import read_prompts
        from dmd_ray.demos import shapes
        from dmd_ray.demos.shapes_eval import TrainingProbe

        try:  # the judge reads the shapes domain only: a run on other prompts has no judge here
            for prompt in read_prompts(cfg.prompts) if cfg.prompts else []:
                shapes.parse_prompt(prompt)
        except ValueError as e:
            raise ConfigError(f"--eval-every scores images with the shapes domain's judge, but {cfg.prompts} is not a shapes prompt set ({e}): "
                              "set --eval-every 0") from None
        probe = TrainingProbe(cfg.eval_samples, cfg.seed)
    real_images = None
    if cfg.gan_weight and cfg.gan_real == "renders":  # the shapes domain's renderer (prepare() checks the prompts with it)
        from dmd_ray.demos.shapes import Renderer

        real_images = Renderer()
    result = distill(cfg, probe, real_images)
    if cfg.teacher == "demo" and cfg.export:
        compare_with_the_shipped_student(cfg)
    return result


def compare_with_the_shipped_student(cfg: DistillConfig) -> None:
    """The demo's last picture: rendered scenes, the teacher (50 PNDM steps), the shipped students (`demo-4step` and
    `demo`, trained on a GPU) and this run's student (in its steps), on the same prompts and seeds."""
    from dmd_ray.data import storage
    from dmd_ray.demos.shapes_eval import comparison_grid
    from dmd_ray.images import png_bytes

    export = storage.join(storage.absolute(cfg.output), "export")
    uri = storage.join(cfg.output, "comparison.png")
    storage.write_bytes(uri, png_bytes(comparison_grid(["teacher:demo", "demo-4step", "demo", export]), min_size=256))
    print(f"[distill] rows of {uri}: rendered scenes; the teacher (50 steps); the shipped demo-4step (4 steps) and demo (1 step) students; this run's student "
          f"({cfg.generator_steps} step{'s' if cfg.generator_steps > 1 else ''})", flush=True)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    defaults = load_yaml(DEMO_PRESET) if not argv else None  # no arguments: the demo
    return cli_main("distill", DistillConfig, run, argv, __doc__.split("\n\n")[0], defaults)


if __name__ == "__main__":
    sys.exit(main())
