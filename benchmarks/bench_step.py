"""One DMD iteration, timed and profiled on one device, in the settings that decide its speed.

    python benchmarks/bench_step.py --teacher demo --dm-batch 64 --reg-batch 16 --steps 30

Rows (same teacher, batches, LPIPS and prompts; one process, one device):
  plain-eager     torch AdamW, eager networks, losses read every step (the plain-torch loop as it was)
  plain-fast      the same loop with the fast settings: compiled networks (--compile), fused AdamW, losses read
                  every --log-every steps
  engines-eager   the Ray Train worker's two DeepSpeed engines (distill_worker.engine), eager, losses read every step
  engines-fast    the same engines with the job's fast settings (--compile, --fused-adamw; auto = on, on GPU)
Today's path before a change is measured by running an older checkout's copy of this script in the same session.
Each row: ms per iteration (median of the timed steps after warm-up), GPU-busy fraction and kernel launches per
iteration from torch.profiler over --profile-steps steps, compile time (first steps beyond the steady step time).
"""
from __future__ import annotations

import argparse
import copy
import dataclasses
import json
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402

from dmd_ray.config import DistillConfig  # noqa: E402
from dmd_ray.data.prompts import BUILTIN_PROMPTS, read_prompts  # noqa: E402
from dmd_ray.distributed.profiling import profile_iterations  # noqa: E402
from dmd_ray.method.objective import read_logs  # noqa: E402
from dmd_ray.method.optim import optimizer_update  # noqa: E402
from dmd_ray.sd.conditioning import PromptConditions  # noqa: E402
from dmd_ray.sd.dmd import build_step  # noqa: E402
from dmd_ray.sd.resolve import load_teacher  # noqa: E402
from dmd_ray.sd.teacher import UNetDenoiser  # noqa: E402


def init_single_process_distributed(device: torch.device) -> None:
    """DeepSpeed outside a launcher: a world of one."""
    import deepspeed

    for key, value in (("RANK", "0"), ("LOCAL_RANK", "0"), ("WORLD_SIZE", "1"), ("MASTER_ADDR", "127.0.0.1"), ("MASTER_PORT", "29533")):
        os.environ.setdefault(key, value)
    if not torch.distributed.is_initialized():
        deepspeed.init_distributed(dist_backend="nccl" if device.type == "cuda" else "gloo")


def build(variant: str, cfg: DistillConfig, teacher, device):
    """(step function, conditions, latent shape) for one variant; the teacher is a fresh copy per variant."""
    from dmd_ray.distributed import distill_worker

    teacher = copy.deepcopy(teacher)
    dtype = torch.bfloat16 if cfg.precision == "bf16" else torch.float32
    prompts = read_prompts(BUILTIN_PROMPTS)
    latent_shape = teacher.latent_shape(teacher.default_resolution)
    rng = torch.Generator().manual_seed(0)
    cfg = dataclasses.replace(cfg, compile="false", fused_adamw="false") if variant.endswith("-eager") else cfg
    mode = cfg.compile_mode(device.type)
    if variant.startswith("plain-"):
        nets = [UNetDenoiser(copy.deepcopy(teacher.unet).to(device).train().requires_grad_(True)) for _ in range(2)]
        for net in nets:
            distill_worker.compile_network(net.unet, mode)
        opts = [torch.optim.AdamW(n.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay, fused=cfg.fused_adamw_on(device.type) or None) for n in nets]
        updates = [optimizer_update(o, n.parameters(), cfg.grad_clip) for o, n in zip(opts, nets)]
    else:
        init_single_process_distributed(device)
        nets = [distill_worker.engine(cfg, teacher.unet, cfg.lr, batch, device) for batch in (cfg.dm_batch_size + cfg.reg_batch_size, cfg.dm_batch_size)]
        updates = [distill_worker.engine_update(net, cfg.grad_clip) for net in nets]
    teacher.to(device=device, dtype=dtype)
    conditions = PromptConditions(teacher, prompts, latent_shape, device)
    step = build_step(cfg, teacher, conditions, nets[0], nets[1], updates[0], updates[1], rng, cfg.dm_batch_size, device)
    distill_worker.compile_frozen(teacher, step.objective, mode)
    # the plain loop autocasts itself; the engines autocast inside (ZeRO-0) or hold bf16 weights (ZeRO 1-3)
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=cfg.precision == "bf16" and variant.startswith("plain-"))

    def run(*args):
        if mode is not None:
            torch.compiler.cudagraph_mark_step_begin()
        with autocast:
            return step(*args)

    return run, conditions, latent_shape


def measure(variant: str, cfg: DistillConfig, teacher, device, steps: int, warmup: int, profile_steps: int, log_every: int) -> dict:
    started = time.perf_counter()
    step, conditions, latent_shape = build(variant, cfg, teacher, device)
    setup_s = time.perf_counter() - started
    prompts = conditions.prompts
    gen = torch.Generator().manual_seed(1)
    batches = [(torch.randn(cfg.reg_batch_size, *latent_shape, generator=gen).to(device), conditions.encode(prompts[i : i + cfg.reg_batch_size]),
                torch.randn(cfg.reg_batch_size, *latent_shape, generator=gen).to(device)) for i in range(0, 8 * cfg.reg_batch_size, cfg.reg_batch_size)]
    every = log_every if variant.endswith("-fast") else 1
    sync = (lambda: torch.cuda.synchronize(device)) if device.type == "cuda" else (lambda: None)

    def run(n: int) -> tuple[dict, float]:
        """n steps, the losses read every `every` steps, as the loop reads them; (last logs, seconds per step)."""
        sync()
        t0 = time.perf_counter()
        for i in range(n):
            logs = step(*batches[i % len(batches)])
            if (i + 1) % every == 0:
                logs = read_logs(logs)
        sync()
        return logs, (time.perf_counter() - t0) / n

    _, first = run(1)
    _, warm = run(warmup - 1) if warmup > 1 else (None, 0.0)
    logs, per_step = run(steps)  # whole windows of `every` steps: per-step times inside a window hide queued work
    row = {"variant": variant, "ms_per_iteration": 1000 * per_step, "first_step_s": first, "setup_s": setup_s,
           "compile_s": max(0.0, first + (warmup - 1) * warm - warmup * per_step), "losses": read_logs(logs)}
    if device.type == "cuda" and profile_steps:
        seconds = []
        row.update(profile_iterations(lambda n: seconds.append(run(n)[1]), profile_steps, device))
        row["gpu_busy"] = row["gpu_s_per_iteration"] / seconds[0]
        row["peak_memory_gib"] = torch.cuda.max_memory_allocated(device) / 2**30
    return row


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--teacher", default="demo")
    p.add_argument("--dm-batch", type=int, default=64)
    p.add_argument("--reg-batch", type=int, default=16)
    p.add_argument("--steps", type=int, default=30)
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--profile-steps", type=int, default=10)
    p.add_argument("--log-every", type=int, default=10)
    p.add_argument("--variants", default="plain-eager,plain-fast,engines-eager,engines-fast")
    p.add_argument("--compile", default="auto")
    p.add_argument("--fused-adamw", default="auto")
    p.add_argument("--zero-stage", type=int, default=0)
    p.add_argument("--lpips", default="alex")
    p.add_argument("--lpips-min-size", type=int, default=64)
    p.add_argument("--gradient-checkpointing", default="false")
    p.add_argument("--json", default="")
    args = p.parse_args(argv)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    cfg = DistillConfig(teacher=args.teacher, dm_batch_size=args.dm_batch, reg_batch_size=args.reg_batch, lr=1e-5, warmup_steps=1,
                        regression_space="pixel", lpips_backbone=args.lpips, lpips_pretrained_backbone=False, lpips_min_size=args.lpips_min_size,
                        zero_stage=args.zero_stage, compile=args.compile, fused_adamw=args.fused_adamw, gradient_checkpointing=args.gradient_checkpointing == "true")
    cfg.check()
    teacher = load_teacher(args.teacher)
    rows = []
    for variant in args.variants.split(","):
        row = measure(variant, cfg, teacher, device, args.steps, args.warmup, args.profile_steps, args.log_every)
        rows.append(row)
        print(json.dumps(row), flush=True)
        if args.json:  # after every row: a later row that runs out of time keeps the earlier ones
            with open(args.json, "w") as f:
                json.dump(rows, f, indent=1)
        torch.cuda.empty_cache() if device.type == "cuda" else None
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    print(f"\n{args.teacher}, DM {args.dm_batch} + regression {args.reg_batch}, LPIPS-{args.lpips} at {args.lpips_min_size}, ZeRO-{args.zero_stage}, {name}, {time.strftime('%Y-%m-%d')}")
    print(f"{'variant':<16}{'ms/it':>9}{'GPU busy':>10}{'launches/it':>13}{'compile s':>11}{'peak GiB':>10}")
    for r in rows:
        print(f"{r['variant']:<16}{r['ms_per_iteration']:>9.1f}{r.get('gpu_busy', float('nan')):>10.2f}{r.get('launches_per_iteration', float('nan')):>13.0f}"
              f"{r['compile_s']:>11.1f}{r.get('peak_memory_gib', float('nan')):>10.1f}")


if __name__ == "__main__":
    main()
