"""Where can a multi-step (DMD2) generator start? A network run as DMD2's n-step chain (denoise at 999, 749, ...,
re-noise to the next timestep with each sample's seeded noise) before any training, scored by the in-training probe.

    python benchmarks/multi_step_start.py                        # CPU, about ten seconds
    python benchmarks/multi_step_start.py --models teacher:demo,demo,runs/x/export --steps 1,2,4
    python benchmarks/multi_step_start.py --models demo-4step --steps 4 --samplers lcm,ddim --samples 360

`teacher:SPEC` is the teacher's network (unguided: a generator runs without guidance); any other model is an
exported generator's network (a built-in name, a folder or s3://). `--samplers`: how the chain re-noises, "lcm" (each
sample's seeded fresh noise, DMD2's) and/or "ddim" (the network's own epsilon, deterministic). Prints a table: probe
FID (judge features, `--samples` evaluation prompts and seeds) and prompt accuracy per model, step count and sampler.
"""
from __future__ import annotations

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402

from dmd_ray.demos.shapes_eval import TrainingProbe  # noqa: E402
from dmd_ray.distributed.run_records import generated_images  # noqa: E402
from dmd_ray.method.generator import MultiStepGenerator  # noqa: E402
from dmd_ray.sd.dmd import generator_timesteps  # noqa: E402
from dmd_ray.sd.resolve import load_teacher, read_generator_info, resolve_generator  # noqa: E402


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--models", default="teacher:demo,demo")
    p.add_argument("--steps", default="1,2,4")
    p.add_argument("--samplers", default="lcm")
    p.add_argument("--samples", type=int, default=120)
    args = p.parse_args()
    device = "cuda" if torch.cuda.is_available() else "cpu"
    torch.set_grad_enabled(False)
    probe = TrainingProbe(args.samples)
    prompts, seeds = probe.rows()
    rows = []
    for spec in args.models.split(","):
        network = load_teacher(spec.removeprefix("teacher:") if spec.startswith("teacher:") else resolve_generator(spec)).to(device=device)
        # a one-step export at a shifted timestep t holds only the teacher's first t + 1 betas (dmd_ray.sd.export): its
        # chains run on the teacher's whole schedule
        schedule = network.schedule if spec.startswith("teacher:") else load_teacher(read_generator_info(resolve_generator(spec))["teacher"]).schedule
        for steps in (int(s) for s in args.steps.split(",")):
            for sampler in args.samplers.split(",") if steps > 1 else ["-"]:  # one step does not re-noise
                chain = MultiStepGenerator(network.denoiser(), schedule, network.prediction_type,
                                           generator_timesteps(schedule.num_timesteps, steps), "lcm" if sampler == "-" else sampler)
                result = probe(generated_images(chain, network, prompts, seeds, network.latent_shape(network.default_resolution), device), prompts)
                rows.append((spec, steps, sampler, result["fid"], result["prompt_accuracy"]))
                print(f"{spec} {steps} steps ({sampler}): FID {result['fid']:.2f}, accuracy {result['prompt_accuracy']:.3f}", flush=True)
    print(f"\n| network | steps | sampler | probe FID ({args.samples}) | prompt accuracy |\n|---|---|---|---|---|")
    for spec, steps, sampler, fid, accuracy in rows:
        print(f"| {spec} | {steps} | {sampler} | {fid:.2f} | {accuracy:.3f} |")


if __name__ == "__main__":
    main()
