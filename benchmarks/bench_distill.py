"""DMD iteration speed: Ray Train + DeepSpeed against the same iteration in a plain torch loop, in one run.

    python benchmarks/bench_distill.py                                  # CPU: tiny teacher, overhead of the stack
    python benchmarks/bench_distill.py --teacher sd15-architecture --dm-batch 8 --reg-batch 2 \
        --zero-stages 0 2 --gradient-checkpointing --steps 12          # one GPU: samples/s, MFU, peak memory

Both paths run `dmd_ray.training.dmd_iteration` (generator update on DM + regression, then the fake-score update).
The plain loop uses torch AdamW on plain modules in this process; the job uses `jobs/distill.py` with one Ray Train
worker and two DeepSpeed engines. Model FLOPs per iteration are counted exactly by running one plain iteration
under torch's FlopCounterMode (every forward and backward; gradient-checkpointing recomputation is not counted).
MFU = model FLOP/s / 720 TFLOP/s (the H100's dense bf16 rate used in the DESIGN notes).
"""
from __future__ import annotations

import argparse
import copy
import dataclasses
import json
import os
import statistics
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.join(ROOT, "jobs"))

import torch  # noqa: E402

from dmd_ray import pairs  # noqa: E402
from dmd_ray.training import DistillConfig, build_objective, builtin_prompts, dmd_iteration, read_history  # noqa: E402

PEAK_TFLOPS = 720.0


def plain_loop(cfg: DistillConfig, pairs_uri: str, steps: int, count_flops: bool) -> dict:
    from dmd_ray.models import UNetDenoiser, load_teacher

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = torch.bfloat16 if cfg.precision == "bf16" else torch.float32
    teacher = load_teacher(cfg.teacher)
    nets = []
    for _ in range(2):
        unet = copy.deepcopy(teacher.unet).train().requires_grad_(True).to(device, dtype)
        if cfg.gradient_checkpointing:
            unet.enable_gradient_checkpointing()
        nets.append(UNetDenoiser(unet))
    teacher.to(device=device, dtype=dtype)
    gen_net, fake_net = nets
    _, objective = build_objective(cfg, teacher, gen_net, fake_net, device)

    def updater(net):
        opt = torch.optim.AdamW(net.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)

        def update(loss):
            opt.zero_grad(set_to_none=True)
            loss.backward()
            norm = torch.nn.utils.clip_grad_norm_(net.parameters(), cfg.grad_clip)
            opt.step()
            return float(norm)

        return update

    update_g, update_f = updater(gen_net), updater(fake_net)
    stream = pairs.PairStream(pairs_uri, cfg.local_reg_batch, 0, 1, cfg.seed)
    prompts = builtin_prompts()
    latent_shape = tuple(pairs.load_manifest(pairs_uri)["config"]["latent_shape"])
    rng = torch.Generator().manual_seed(0)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    flops = None
    if count_flops:
        from torch.utils.flop_counter import FlopCounterMode

        counter = FlopCounterMode(display=False)
        with counter:
            dmd_iteration(cfg, objective, teacher, prompts, next(stream), rng, latent_shape, device, update_g, update_f, fake_net)
        flops = counter.get_total_flops()
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    times = []
    for _ in range(steps):
        sync()
        t0 = time.perf_counter()
        dmd_iteration(cfg, objective, teacher, prompts, next(stream), rng, latent_shape, device, update_g, update_f, fake_net)
        sync()
        times.append(time.perf_counter() - t0)
    stream.close()
    out = {"step_time_s": statistics.median(times[2:] if len(times) > 4 else times), "flops_per_iteration": flops}
    if device.type == "cuda":
        out["peak_memory_gib"] = torch.cuda.max_memory_allocated() / 2**30
    del teacher, gen_net, fake_net, objective
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return out


def ray_job(cfg: DistillConfig) -> dict:
    import distill

    distill.run(cfg)
    history = read_history(cfg.output)
    times = [r["step_time_s"] for r in history[2:]] or [r["step_time_s"] for r in history]
    out = {"step_time_s": statistics.median(times)}
    if "peak_memory_gib" in history[-1]:
        out["peak_memory_gib"] = max(r["peak_memory_gib"] for r in history)
    return out


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--teacher", default="tiny")
    p.add_argument("--dm-batch", type=int, default=8)
    p.add_argument("--reg-batch", type=int, default=4)
    p.add_argument("--steps", type=int, default=30)
    p.add_argument("--zero-stages", type=int, nargs="+", default=[0, 2])
    p.add_argument("--regression-space", default="pixel")
    p.add_argument("--gradient-checkpointing", action="store_true")
    p.add_argument("--skip-plain", action="store_true")
    p.add_argument("--json")
    args = p.parse_args()
    gpu = torch.cuda.is_available()
    work = tempfile.mkdtemp(prefix="bench-distill-")
    prompts = os.path.join(work, "prompts.txt")
    with open(prompts, "w") as f:
        f.write("\n".join(builtin_prompts()))

    import generate_pairs

    from dmd_ray.ray_utils import init_ray

    init_ray()
    pairs_uri = os.path.join(work, "pairs")
    n_pairs = max(16, args.reg_batch * (args.steps + 4))
    # the pairs' content does not change the cost: a 2-step sampler makes them quickly
    generate_pairs.run(pairs.PairsConfig(teacher=args.teacher, prompts=prompts, num_pairs=n_pairs, shard_size=n_pairs, steps=2, sampler="ddim", out=pairs_uri, batch_size=8))
    base = DistillConfig(
        teacher=args.teacher, prompts=prompts, pairs=pairs_uri, dm_batch_size=args.dm_batch, reg_batch_size=args.reg_batch, max_steps=args.steps,
        num_workers=1, lr=1e-5, warmup_steps=10, regression_space=args.regression_space, lpips_backbone="vgg", lpips_pretrained_backbone=False,
        gradient_checkpointing=args.gradient_checkpointing, checkpoint_every=0, sample_every=0, export=False, log_every=10,
        cpus_per_worker=float(os.cpu_count() or 1) if not gpu else 4.0,
    )
    rows: dict[str, dict] = {}
    if not args.skip_plain:
        rows["plain loop (torch AdamW)"] = plain_loop(base, pairs_uri, args.steps, count_flops=True)
    for stage in args.zero_stages:
        cfg = dataclasses.replace(base, zero_stage=stage, output=os.path.join(work, f"zero{stage}"))
        try:
            rows[f"ray train + deepspeed ZeRO-{stage}"] = ray_job(cfg)
        except Exception as e:  # noqa: BLE001 - an OOM at this batch is a result too
            rows[f"ray train + deepspeed ZeRO-{stage}"] = {"error": str(e).splitlines()[0][:200]}
    flops = next((r["flops_per_iteration"] for r in rows.values() if r.get("flops_per_iteration")), None)
    device = torch.cuda.get_device_name() if gpu else f"CPU ({os.cpu_count()} cores)"
    samples = args.dm_batch + args.reg_batch
    print(f"\nDMD iteration: teacher {args.teacher}, DM batch {args.dm_batch} + regression batch {args.reg_batch} ({args.regression_space}), "
          f"gradient checkpointing {args.gradient_checkpointing}, {device}")
    if flops:
        print(f"model FLOPs per iteration: {flops / 1e12:.2f} TFLOP")
    print(f"{'':34}{'step s':>9}{'samples/s':>11}{'TFLOP/s':>9}{'MFU':>7}{'peak GiB':>10}")
    for name, r in rows.items():
        if "error" in r:
            print(f"{name:34} failed: {r['error']}")
            continue
        tflops = flops / r["step_time_s"] / 1e12 if flops else float("nan")
        mfu = f"{100 * tflops / PEAK_TFLOPS:.1f}%" if gpu and flops else "-"
        peak = f"{r['peak_memory_gib']:.1f}" if "peak_memory_gib" in r else "-"
        print(f"{name:34}{r['step_time_s']:>9.3f}{samples / r['step_time_s']:>11.2f}{tflops:>9.1f}{mfu:>7}{peak:>10}")
    plain = rows.get("plain loop (torch AdamW)")
    for name, r in rows.items():
        if plain and "error" not in r and r is not plain:
            print(f"{name} step time / plain loop: {r['step_time_s'] / plain['step_time_s']:.3f}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"args": vars(args), "device": device, "flops_per_iteration": flops, "rows": rows}, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
