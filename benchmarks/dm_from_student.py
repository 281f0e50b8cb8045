"""Does the distribution-matching term (or DMD2's GAN) improve a good one-step student, or undo it? A plain-torch
probe on any device.

    python benchmarks/dm_from_student.py --lr 1e-5 --fake-updates 1 --steps 25        # CPU, about half a minute
    python benchmarks/dm_from_student.py --lr 1e-6 --fake-lr 1e-5 --fake-updates 5 --steps 100 --fake-warmup 200
    python benchmarks/dm_from_student.py --gan-weight 3e-3 --lr 1e-6 --fake-lr 1e-5 --fake-updates 5   # + GAN on renders

The generator starts from an exported student (`--student`, the packaged `demo` by default: regression-trained),
the fake score from the teacher; the fake score first trains alone for `--fake-warmup` updates on the student's
samples, then DMD runs without regression (so that DM, and the GAN with `--gan-weight`, alone move the generator),
through the same `build_step` as the job, with torch's AdamW in float32. The GAN's classifier sees real images: the
shapes domain's renders, encoded by the teacher's VAE (the job's `--gan-real renders`). Every `--probe-every` steps
the in-training probe scores the generator (FID in the judge's features and prompt accuracy on `--probe-samples`
samples of the evaluation prompts); the first row is the student as loaded. Prints a table.
"""
from __future__ import annotations

import argparse
import copy
import dataclasses
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402

from dmd_ray.config import DistillConfig  # noqa: E402
from dmd_ray.data.prompts import BUILTIN_PROMPTS, read_prompts  # noqa: E402
from dmd_ray.demos.shapes import Renderer  # noqa: E402
from dmd_ray.demos.shapes_eval import TrainingProbe  # noqa: E402
from dmd_ray.distributed.run_records import generated_images  # noqa: E402
from dmd_ray.method.objective import read_logs  # noqa: E402
from dmd_ray.method.optim import optimizer_update  # noqa: E402
from dmd_ray.sd.conditioning import PromptConditions  # noqa: E402
from dmd_ray.sd.dmd import build_step, gan_classifier  # noqa: E402
from dmd_ray.sd.real_bank import RealLatentBank  # noqa: E402
from dmd_ray.sd.resolve import load_teacher, resolve_generator  # noqa: E402
from dmd_ray.sd.teacher import UNetDenoiser  # noqa: E402


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--teacher", default="demo")
    p.add_argument("--student", default="demo")
    p.add_argument("--lr", type=float, default=1e-5, help="the generator's")
    p.add_argument("--fake-lr", type=float, default=0.0, help="0: --lr")
    p.add_argument("--fake-updates", type=int, default=1)
    p.add_argument("--guidance-scale", type=float, default=3.0)
    p.add_argument("--t-min", type=float, default=0.02, help="DM timesteps, fractions of T")
    p.add_argument("--dm-weight", type=float, default=1.0, help="0: the GAN alone (with --gan-weight)")
    p.add_argument("--gan-weight", type=float, default=0.0)
    p.add_argument("--gan-features", default="bottleneck", help="the fake score's features the GAN head reads: bottleneck or decoder")
    p.add_argument("--real-size", type=int, default=2048, help="renders in the GAN's bank of real latents")
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--steps", type=int, default=25)
    p.add_argument("--fake-warmup", type=int, default=50)
    p.add_argument("--probe-every", type=int, default=25)
    p.add_argument("--probe-samples", type=int, default=180)
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")

    teacher = load_teacher(args.teacher)
    cfg = DistillConfig(teacher=args.teacher, init_generator=args.student, lambda_reg=0.0, dm_batch_size=args.batch, lr=args.lr,
                        fake_lr=args.fake_lr, guidance_scale=args.guidance_scale, fake_updates=args.fake_updates, precision="fp32", t_min=args.t_min,
                        dm_weight=args.dm_weight, gan_weight=args.gan_weight, gan_real="renders",
                        gan_features=args.gan_features)
    cfg.check()
    student = load_teacher(resolve_generator(args.student)).unet
    nets = [UNetDenoiser(copy.deepcopy(unet).float().train().requires_grad_(True), head).to(device)
            for unet, head in ((student, None), (teacher.unet, gan_classifier(cfg, teacher.unet)))]
    updates = [optimizer_update(torch.optim.AdamW(net.parameters(), lr=lr, weight_decay=cfg.weight_decay), net.parameters(), cfg.grad_clip)
               for net, lr in zip(nets, (args.lr, args.fake_lr or args.lr))]
    teacher.to(device)
    shape = teacher.latent_shape(teacher.default_resolution)
    conditions = PromptConditions(teacher, read_prompts(BUILTIN_PROMPTS), shape, device)
    rng = torch.Generator().manual_seed(0)
    real = RealLatentBank(teacher, conditions, Renderer(), args.real_size, teacher.default_resolution) if args.gan_weight else None
    step = build_step(cfg, teacher, conditions, nets[0], nets[1], updates[0], updates[1], rng, args.batch, device,
                      draw_real=real.draw if real else None)
    probe = TrainingProbe(args.probe_samples, cfg.seed)

    def score() -> dict:
        prompts, seeds = probe.rows()
        return probe(generated_images(step.objective.generator, teacher, prompts, seeds, shape, device), prompts)

    rows = [("student", 0, score(), {})]
    started = time.perf_counter()
    warmup_logs = []
    for _ in range(args.fake_warmup):  # the fake score first learns the student's samples
        noise, cond = conditions.draw(args.batch, rng)
        real_latents, real_cond = real.draw(args.batch, rng) if real else (None, None)
        loss, logs = step.objective.fake_score_loss(nets[1], noise, cond, generator=rng, real=real_latents, real_cond=real_cond)
        updates[1](loss)
        warmup_logs.append(read_logs(logs))
    rows.append(("fake score warmed up", 0, score(), read_logs(logs)))
    stage = "DM" + (" + GAN" if args.gan_weight else "") if args.dm_weight else "GAN"
    for i in range(1, args.steps + 1):
        logs = step()
        if i % args.probe_every == 0 or i == args.steps:
            rows.append((stage, i, score(), read_logs(logs)))
    print(f"\n{args}\n{time.perf_counter() - started:.0f} s\n")
    if args.gan_weight and warmup_logs:  # how well the head tells the student's samples from renders (chance: 2 ln 2)
        quarters = [warmup_logs[i * len(warmup_logs) // 4:(i + 1) * len(warmup_logs) // 4] or warmup_logs for i in range(4)]
        means = [sum(logs["loss_gan_discriminator"] for logs in q) / len(q) for q in quarters]
        print(f"the classifier's loss over the warm-up's quarters ({args.gan_features} features; chance 1.386): "
              + " / ".join(f"{m:.3f}" for m in means) + "\n")
    print("| stage | steps | probe FID | probe accuracy | loss_dm | loss_fake | loss_gan G / D | grad norm G |")
    print("|---|---|---|---|---|---|---|---|")
    for stage, i, metrics, logs in rows:
        print(f"| {stage} | {i} | {metrics['fid']:.2f} | {metrics['prompt_accuracy']:.3f} | {logs.get('loss_dm', float('nan')):.3f} | "
              f"{logs.get('loss_fake', float('nan')):.4f} | {logs.get('loss_gan_generator', float('nan')):.3f} / "
              f"{logs.get('loss_gan_discriminator', float('nan')):.3f} | {logs.get('grad_norm_generator', float('nan')):.1f} |")


if __name__ == "__main__":
    main()
