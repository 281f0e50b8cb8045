"""Can one network call learn what a few-step student draws? A one-step student regressed (L2 on latents) onto a
multi-step generator's deterministic samples, drawn fresh every iteration: no pair dataset, no teacher ODE.

    python benchmarks/regress_onto_steps.py --steps 25 --probe-every 25                       # CPU, about a minute
    python benchmarks/regress_onto_steps.py --steps 1500 --probe-every 250 --out runs/reg4    # CPU, about 20 minutes
    python benchmarks/regress_onto_steps.py --steps 20000 --batch 256 --lr 1e-4 --out runs/reg4   # a GPU, if there is one
    python benchmarks/regress_onto_steps.py --student teacher:demo --student-timestep 399 ...   # DMD2's timestep shift

The student starts from `--student` (the packaged one-step `demo`, or `teacher:demo`: the teacher's network), read at
`--student-timestep` (-1: the student's own, 999 for the teacher; DMD2's one-step SDXL reads pure noise at 399, where
an epsilon network's x0 = (z - sqrt(1 - a) eps) / sqrt(a) amplifies its error 1.5x instead of 14.6x at 999). The
targets come from `--target` (the packaged `demo-4step`) run in its steps with DDIM's deterministic re-noising
(`--target-sampler ddim`; with `lcm` each target would hold fresh noise the student cannot see), or with
`--target teacher:SPEC` from the teacher's guided ODE (DMD's regression targets: `--target-steps` of `--target-sampler`
pndm at `--target-guidance` 3, as the pairs are made, but fresh for every noise instead of a fixed pair set). Each iteration draws
`--batch` noises and prompts of the shapes domain, makes the target latents without gradients and takes one AdamW step
(float32) on the mean squared latent error. Every `--probe-every` steps the in-training probe scores the student (FID
in the judge's features and prompt accuracy on `--probe-samples` evaluation prompts and seeds; step 0 is the student
as loaded). With `--out` the student is exported there at the end, or when `--minutes` have passed (with
`--ema-decay`, the weight average; float16, a one-step generator folder that jobs/evaluate.py and diffusers load), with the
probe's history (`metrics.jsonl`, `metrics.png`).
"""
from __future__ import annotations

import argparse
import contextlib
import json
import os
import random
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402

from dmd_ray.data.prompts import read_prompts  # noqa: E402
from dmd_ray.demos.shapes_eval import TrainingProbe, model_kind  # noqa: E402
from dmd_ray.distributed.run_records import generated_images, plot_history  # noqa: E402
from dmd_ray.method.generator import MultiStepGenerator, OneStepGenerator  # noqa: E402
from dmd_ray.method.losses import RegressionLoss  # noqa: E402
from dmd_ray.method.optim import WeightAverage  # noqa: E402
from dmd_ray.sd.export import export_generator  # noqa: E402
from dmd_ray.sd.resolve import load_teacher, read_generator_info, resolve_generator  # noqa: E402
from dmd_ray.sd.teacher_sampler import SAMPLERS, PairSampler  # noqa: E402

PROMPTS = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "dmd_ray", "assets", "shapes_prompts.txt")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--student", default="demo", help="a one-step generator, or teacher:SPEC to start from a teacher's network")
    p.add_argument("--student-timestep", type=int, default=-1, help="the timestep the student reads pure noise at; -1: its own")
    p.add_argument("--target", default="demo-4step", help="a multi-step generator, or teacher:SPEC for the teacher's guided ODE")
    p.add_argument("--target-sampler", default="", help="a multi-step generator's: ddim (default) or lcm; a teacher's: a pair "
                   "sampler (pndm default, ddim, euler, dpmpp, unipc)")
    p.add_argument("--target-steps", type=int, default=50, help="a teacher target's ODE steps")
    p.add_argument("--target-guidance", type=float, default=3.0, help="a teacher target's guidance scale")
    p.add_argument("--steps", type=int, default=1500)
    p.add_argument("--lr", type=float, default=3e-5)
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--probe-every", type=int, default=250)
    p.add_argument("--probe-samples", type=int, default=360)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--ema-decay", type=float, default=0.0, help="probe and export a weight average (warmed up) of the student; 0: none")
    p.add_argument("--minutes", type=float, default=0.0, help="stop (probe, export) after this long; 0: after --steps")
    p.add_argument("--out", default="", help="export the student here at the end")
    args = p.parse_args()
    if args.steps < 1:
        p.error(f"--steps must be >= 1, got {args.steps}")
    torch.manual_seed(args.seed)
    rng = random.Random(args.seed)
    kind, source = model_kind(args.student)
    if kind == "teacher-onestep":
        raise SystemExit("--student is a one-step generator or teacher:SPEC")
    target_kind, target_source = model_kind(args.target)
    if target_kind == "teacher-onestep":
        raise SystemExit("--target is a multi-step generator or teacher:SPEC")
    samplers = sorted(SAMPLERS) if target_kind == "teacher" else ["ddim", "lcm"]
    target_sampler = args.target_sampler or ("pndm" if target_kind == "teacher" else "ddim")
    if target_sampler not in samplers:
        p.error(f"--target-sampler for {args.target} is one of {samplers}, got {target_sampler!r}")
    student_folder = source if kind == "teacher" else resolve_generator(source)
    target_folder = target_source if target_kind == "teacher" else resolve_generator(target_source)
    info = {"teacher": source} if kind == "teacher" else read_generator_info(student_folder)
    timestep = args.student_timestep if args.student_timestep >= 0 else int(info.get("generator_timestep", 999))
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    torch.backends.cuda.matmul.allow_tf32 = True
    student = load_teacher(student_folder).to(device, torch.float32)
    target = load_teacher(target_folder).to(device, torch.float32)
    if target_kind == "teacher":  # DMD's regression targets, drawn fresh: pairs made as the pair job makes them
        pairs = PairSampler(target, sampler=target_sampler, steps=args.target_steps, guidance_scale=args.target_guidance,
                            resolution=target.default_resolution, device=device, dtype=torch.float32)

        def noise_and_target(prompts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
            noise, wanted = pairs(prompts, [rng.randrange(2**31) for _ in prompts])
            return noise.to(device).clone(), wanted.to(device).clone()  # plain tensors (the sampler's are inference tensors)
    else:
        timesteps = [int(t) for t in read_generator_info(target_folder)["generator_timesteps"]]
        chain = MultiStepGenerator(target.denoiser(), target.schedule, target.prediction_type, timesteps, target_sampler)

        def noise_and_target(prompts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
            noise = torch.randn(len(prompts), *shape, device=device)
            return noise, chain(noise, target.encode_prompts(prompts))
    generator = OneStepGenerator(student.denoiser(), student.schedule, student.prediction_type, timestep)
    for network in (target.unet, target.text_encoder, student.text_encoder, student.vae):
        network.requires_grad_(False)
    student.unet.requires_grad_(True)
    optimizer = torch.optim.AdamW(student.unet.parameters(), lr=args.lr, weight_decay=0.01)
    average = WeightAverage(student.unet, args.ema_decay) if args.ema_decay > 0 else None
    averaged = average.swapped_in if average else contextlib.nullcontext  # the probe and the export see what ships
    regression = RegressionLoss()  # the job's latent regression (--regression-space latent): squared L2 per sample, meaned
    prompts = read_prompts(PROMPTS)
    probe = TrainingProbe(args.probe_samples)
    probe_prompts, probe_seeds = probe.rows()
    shape = student.latent_shape(student.default_resolution)
    print(f"| step | mean loss since the last probe | probe FID ({args.probe_samples}) | prompt accuracy | s/it |\n|---|---|---|---|---|")

    def report(step: int, losses: list[torch.Tensor], seconds: float) -> None:
        with torch.no_grad(), averaged():
            result = probe(generated_images(generator, student, probe_prompts, probe_seeds, shape, device), probe_prompts)
        loss = f"{torch.stack(losses).mean().item():.4f}" if losses else "-"
        history.append({"step": step, "eval_fid": result["fid"], "eval_prompt_accuracy": result["prompt_accuracy"],
                        **({"loss_reg": float(loss)} if losses else {})})
        print(f"| {step} | {loss} | {result['fid']:.2f} | {result['prompt_accuracy']:.3f} | {seconds:.2f} |", flush=True)

    history: list[dict] = []
    report(0, [], 0.0)
    losses, started = [], time.perf_counter()
    deadline = started + 60 * args.minutes if args.minutes > 0 else float("inf")
    for step in range(1, args.steps + 1):
        batch_prompts = rng.choices(prompts, k=args.batch)
        with torch.no_grad():
            cond = student.encode_prompts(batch_prompts)
            noise, wanted = noise_and_target(batch_prompts)
        loss = regression(generator(noise, cond), wanted)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        if average:
            average.update(step)
        losses.append(loss.detach())
        out_of_time = time.perf_counter() > deadline
        if step % args.probe_every == 0 or step == args.steps or out_of_time:
            report(step, losses, (time.perf_counter() - started) / step)
            losses = []
        if out_of_time:
            print(f"stopped at step {step}: --minutes {args.minutes} passed")
            break
    if args.out:
        recipe = {"student": args.student, "student_timestep": timestep, "target": args.target, "target_sampler": target_sampler,
                  **({"target_steps": args.target_steps, "target_guidance": args.target_guidance} if target_kind == "teacher" else {}), "steps": step,
                  "lr": args.lr, "batch": args.batch, "ema_decay": args.ema_decay, "loss": "latent L2 onto the target's samples", "script": "benchmarks/regress_onto_steps.py"}
        student.to("cpu")
        with averaged():
            export_generator(student, student.unet, args.out, generator.timestep, {"teacher": info.get("teacher", ""), "recipe": recipe},
                             dtype=torch.float16)
        with open(os.path.join(args.out, "metrics.jsonl"), "w") as f:  # the probe's history, and its plot beside it
            f.writelines(json.dumps(row) + "\n" for row in history)
        with open(os.path.join(args.out, "metrics.png"), "wb") as f:
            f.write(plot_history(history))
        print(f"exported to {args.out}")


if __name__ == "__main__":
    main()
