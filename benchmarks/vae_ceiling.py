"""What the teacher's autoencoder lets any latent model reach: renders of the evaluation prompts encoded and decoded
by the teacher's VAE, scored like a generator (the judge's FID against other renders, prompt accuracy, per-attribute
accuracy and which shapes it turns into others). A teacher and its students decode through this VAE, so no row of
`jobs/evaluate.py` can read better than this one on what the VAE loses.

    python benchmarks/vae_ceiling.py                       # the demo teacher, 1,440 prompts (CPU, about 30 s)
    python benchmarks/vae_ceiling.py --teacher runs/t/teacher --samples 360
"""
from __future__ import annotations

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402

from dmd_ray.config import EvalConfig  # noqa: E402
from dmd_ray.demos import shapes  # noqa: E402
from dmd_ray.demos.shapes_eval import metrics, reference_renders, sample_rows  # noqa: E402
from dmd_ray.images import to_uint8  # noqa: E402
from dmd_ray.sd.resolve import load_teacher  # noqa: E402


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--teacher", default="demo")
    p.add_argument("--samples", type=int, default=1440, help="evaluation rows (the evaluation job's prompts and seeds)")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args()
    torch.set_grad_enabled(False)
    vae = load_teacher(args.teacher).vae.eval()
    cfg = EvalConfig(num_samples=args.samples, seed=args.seed)
    rows = sample_rows(cfg)
    prompts = [r["prompt"] for r in rows]
    # the reference renders as jobs/evaluate.py draws them; the renders sent through the VAE are other draws of the
    # same prompts, so that the renders' own row measures what two independent draws differ by
    real = reference_renders(prompts, cfg.seed)
    renders = shapes.render([shapes.parse_prompt(p) for p in prompts], seed=cfg.seed + 2 * 10**6)
    decoded = torch.cat([vae.decode(vae.encode(renders[i : i + 256]).latent_dist.mean).sample for i in range(0, len(renders), 256)])
    judge = shapes.load_classifier()
    print(f"{args.teacher}'s VAE, {len(rows)} evaluation prompts and seeds")
    print("| images | FID (judge features) | prompt accuracy | shape | colour | size | background |")
    print("|---|---|---|---|---|---|---|")
    read_as = {}
    for name, images in (("renders", renders), ("renders through the VAE", decoded)):
        m = metrics(to_uint8(images), prompts, judge, real, intervals=False)
        read_as[name] = m["shape_read_as"]
        print(f"| {name} | {m['fid']:.3f} | {m['prompt_accuracy']:.3f} | " + " | ".join(f"{m[a + '_accuracy']:.3f}" for a in ("shape", "colour", "size", "background")) + " |")
    for name, table in read_as.items():
        print(f"{name}, read as: " + "; ".join(f"{key}: " + " ".join(f"{s} {v:.2f}" for s, v in fractions.items()) for key, fractions in table.items()))


if __name__ == "__main__":
    main()
