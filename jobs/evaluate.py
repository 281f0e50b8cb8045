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
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # the repo root, for `ray job submit --working-dir .`

from dmd_ray.config import EvalConfig  # noqa: E402
from dmd_ray.demos.shapes_eval import evaluate  # noqa: E402
from dmd_ray.distributed.cluster import init_ray  # noqa: E402
from dmd_ray.typed_config import cli_main  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    return cli_main("evaluate", EvalConfig, evaluate, argv, __doc__.split("\n\n")[0], setup=init_ray)


if __name__ == "__main__":
    sys.exit(main())
