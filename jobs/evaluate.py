"""Evaluate generators on the shapes domain: Ray Data batch inference over the evaluation prompts, then FID, KID,
prompt accuracy and LPIPS diversity, and a comparison grid (same prompts and seeds in every row).

    python jobs/evaluate.py --model runs/distill-demo/export --num-samples 1000 --output runs/eval
    python jobs/evaluate.py --model teacher:demo,teacher-onestep:demo,runs/d/export,runs/no_reg/export --output runs/eval

A model is an exported generator (built-in name, local folder or s3://), `teacher:SPEC` (the teacher's guided ODE
sampler) or `teacher-onestep:SPEC` (the teacher's network once, what DMD starts from). dmd_ray/demos/shapes_eval.py
says how samples are drawn and what each metric means; `--help` lists every key.
"""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # the repo root, for `ray job submit --working-dir .`

from dmd_ray.config import EvalConfig, cli_main  # noqa: E402
from dmd_ray.demos.shapes_eval import evaluate  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    return cli_main("evaluate", EvalConfig, evaluate, argv, __doc__.split("\n\n")[0])


if __name__ == "__main__":
    sys.exit(main())
