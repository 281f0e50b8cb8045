"""DMD iteration speed: Ray Train + DeepSpeed against the same iteration in a plain torch loop, in one run.

    python benchmarks/bench_distill.py                                  # CPU: tiny teacher, overhead of the stack
    python benchmarks/bench_distill.py --steps 3 --dm-batch 2 --reg-batch 1 --zero-stages 0   # CPU smoke run
    python benchmarks/bench_distill.py --teacher sd15-architecture --dm-batch 16 --reg-batch 4 \
        --zero-stages 2 --gradient-checkpointing --steps 12 --log-every 4 --baselines   # one GPU: samples/s, MFU, memory
    python benchmarks/bench_distill.py --teacher demo --dm-batch 64 --reg-batch 16 --lpips-backbone alex \
        --lpips-min-size 64 --zero-stages 0 --steps 100 --log-every 25 --baselines --baseline-steps 20   # issue 14

Rows: the fast settings the job uses by default (--compile auto: CUDA graphs under ZeRO-0, torch.compile's default
mode under ZeRO 1-2; fused AdamW on GPU; the losses read every --log-every steps), then with --baselines the path
before issue 14 (eager networks, per-tensor AdamW, the losses read and reported to Ray Train every step).

Both paths call the DMDStep that `dmd_ray.sd.dmd.build_step` builds, once per batch, exactly as the Ray Train worker
(dmd_ray/distributed/distill_worker.py) does: next batch of pairs, encode its prompts, step, read the logs. They
differ only in the networks and update functions handed to `build_step`: the plain loop passes plain modules with
torch AdamW (`dmd_ray.method.optim.adamw` + `optimizer_update`, the worker's warm-up schedule; under ZeRO-0 with
flat_optimizer over one flat buffer, as the engines) in this process, in
the engines' numerics (ZeRO-0: fp32 weights under bf16 autocast; ZeRO 1-3: bf16 weights), compiles its networks as
the worker does and reads pairs with pyarrow; the job is `dmd_ray.distributed.distill_driver.distill` with one Ray
Train worker and two DeepSpeed engines.

Model FLOPs per iteration are counted by torch's FlopCounterMode over one whole plain-loop iteration (every forward
and backward: generator, real and fake scores, VAE decode and LPIPS), with gradient checkpointing off for that one
iteration so that recomputation is not counted. Utilisation = model FLOP/s / the rate of a large matmul measured
on the same device in the same run (benchmarks/common.py: bf16 8192^3 on a GPU; fp32 2048^3 on a CPU, labelled).
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

import torch  # noqa: E402

from benchmarks.common import Peak, count_flops, default_device, device_name, peak_matmul, print_table, synchronize  # noqa: E402
from dmd_ray.config import DistillConfig, PairsConfig  # noqa: E402
from dmd_ray.data.prompts import BUILTIN_PROMPTS, read_prompts  # noqa: E402

PLAIN = "plain loop (torch AdamW)"
# the pairs' content does not change the cost: a 2-step sampler makes them quickly
PAIR_SAMPLER, PAIR_STEPS = "ddim", 2


def flat_update(optimizer: torch.optim.Optimizer, flat, grad_clip: float, scheduler):
    """The ZeRO-0 engine's update with flat_optimizer (distill_worker.engine_update) without DeepSpeed: backward,
    the gradients gathered into the flat one, clipped with the norm on the device, one AdamW step over the buffer."""

    def update(loss: torch.Tensor) -> torch.Tensor:
        flat.drop_gradients()
        loss.backward()
        flat.gather_gradients()
        norm = flat.clip_gradients(grad_clip or float("inf"))
        optimizer.step()
        scheduler.step()
        return norm

    return update


def plain_loop(cfg: DistillConfig, pairs_uri: str, steps: int, profile_steps: int = 0) -> dict:
    """The worker's loop body on plain modules with torch AdamW, in this process, with the job's fast settings
    (cfg.compile in the mode of cfg.zero_stage, cfg.fused_adamw, losses read every cfg.log_every steps)."""
    from dmd_ray.distributed.distill_worker import COMPILE_STEPS, Autocast, compile_frozen, compile_network, step_guards, worker_threads
    from dmd_ray.distributed.pair_job import PairStream, read_with_pyarrow
    from dmd_ray.distributed.profiling import profile_iterations
    from dmd_ray.method.objective import read_logs
    from dmd_ray.method.optim import FlatParameters, adamw, optimizer_update
    from dmd_ray.method.transfer import to_device
    from dmd_ray.sd.conditioning import PromptConditions
    from dmd_ray.sd.dmd import build_step
    from dmd_ray.sd.resolve import load_teacher
    from dmd_ray.sd.teacher import UNetDenoiser

    device = default_device()
    torch.set_num_threads(worker_threads(cfg))  # the worker's: its compiled graphs are then the same in Inductor's cache
    dtype = torch.bfloat16 if cfg.precision == "bf16" else torch.float32
    mode = cfg.compile_mode(device.type)
    # the numerics of the engines it is compared with: ZeRO-0 trains fp32 weights under bf16 autocast (inside the
    # engine's forward only: the frozen teacher, VAE and LPIPS run outside it, as in the worker), ZeRO 1-3 bf16
    # weights (DeepSpeed's bf16 mode); the same graphs also let the Ray worker reuse this process's compiled kernels
    autocast = cfg.precision == "bf16" and cfg.zero_stage == 0
    weights_dtype = torch.float32 if autocast else dtype
    teacher = load_teacher(cfg.teacher, cache_dir=cfg.cache_dir or None)
    unets, nets, updates = [], [], []
    for lr in (cfg.lr, cfg.fake_lr or cfg.lr):  # generator, fake score: each a copy of the teacher's UNet
        unet = copy.deepcopy(teacher.unet).train().requires_grad_(True).to(device, weights_dtype)
        # the optimizer of the engines it is compared with: under ZeRO-0 with flat_optimizer, one flat buffer
        flat = FlatParameters(unet.parameters()) if cfg.zero_stage == 0 and cfg.flat_optimizer else None
        params = [flat.flat] if flat else list(unet.parameters())
        optimizer, scheduler = adamw(params, lr, max(1, cfg.warmup_steps), weight_decay=cfg.weight_decay, fused=cfg.fused_adamw_on(device.type))
        if flat and cfg.channels_last_on(device.type):  # as the engines
            flat.relayout(torch.channels_last, optimizer)
        unets.append(unet)
        nets.append(Autocast(UNetDenoiser(unet), device.type) if autocast else UNetDenoiser(unet))
        updates.append(flat_update(optimizer, flat, cfg.grad_clip, scheduler) if flat else optimizer_update(optimizer, params, cfg.grad_clip, scheduler))
    teacher.to(device=device, dtype=dtype)
    latent_shape = teacher.latent_shape(cfg.resolution or teacher.default_resolution)
    prompts = read_prompts(cfg.prompts or BUILTIN_PROMPTS)
    conditions = PromptConditions(teacher, prompts, latent_shape, device)
    rng = torch.Generator("cpu").manual_seed(cfg.seed * 1000)  # rank 0's
    step_fn = build_step(cfg, teacher, conditions, nets[0], nets[1], updates[0], updates[1], rng, cfg.local_dm_batch, device)
    stream = PairStream(pairs_uri, cfg.local_reg_batch, 0, 1, cfg.seed, read=read_with_pyarrow)

    warm = False  # once the compiled graphs exist, steps check only the guards that tell them apart (as the worker)

    def iteration() -> dict:  # the worker's loop body
        batch = next(stream)
        pair_cond = conditions.encode(batch["prompt"]) if step_fn.objective.uses_regression else None
        if mode is not None:
            torch.compiler.cudagraph_mark_step_begin()
        with step_guards(cfg, warm):
            return step_fn(to_device(batch["noise"], device, torch.float32), pair_cond, to_device(batch["target"], device, torch.float32))

    # model FLOPs: one eager iteration without gradient checkpointing (its recomputation is not model work)
    flops_include_recompute = False
    try:
        _, flops = count_flops(lambda: read_logs(iteration()))
    except torch.cuda.OutOfMemoryError:
        if not cfg.gradient_checkpointing:
            raise
        torch.cuda.empty_cache()
        for unet in unets:
            unet.enable_gradient_checkpointing()
        _, flops = count_flops(lambda: read_logs(iteration()))
        flops_include_recompute = True
    if cfg.gradient_checkpointing:
        for unet in unets:
            unet.enable_gradient_checkpointing()
    for unet in unets:
        compile_network(unet, mode)
    compile_frozen(teacher, step_fn.objective, mode, cfg.channels_last_on(device.type))
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()

    def window(n: int) -> float:
        """n iterations, the losses read after the last (as the worker reads them every log_every steps): seconds."""
        synchronize(device)
        started = time.perf_counter()
        for _ in range(n):
            logs = iteration()
        read_logs(logs)
        synchronize(device)
        return time.perf_counter() - started

    first = window(COMPILE_STEPS)  # compilation and CUDA graph recording happen here
    warm = mode is not None
    if mode is not None:
        from dmd_ray import compile_cache

        print(f"[bench_distill] plain loop compiled: {compile_cache.summary()}", flush=True)
    every = max(1, cfg.log_every)
    times = [window(every) / every for _ in range(max(1, steps // every))]
    step_time = statistics.median(times[1:] if len(times) > 2 else times)
    out = {}
    if profile_steps and device.type == "cuda":
        try:
            out.update(profile_iterations(window, profile_steps, device))
        except Exception as e:  # noqa: BLE001 - the timing above stands without the profile
            out["profile_error"] = f"{type(e).__name__}: {e}"[:200]
    stream.close()
    out |= {"step_time_s": step_time, "compile_s": max(0.0, first - COMPILE_STEPS * step_time), "flops_per_iteration": flops,
           "flops_include_recompute": flops_include_recompute}
    if device.type == "cuda":
        out["peak_memory_gib"] = torch.cuda.max_memory_allocated() / 2**30
    del teacher, nets, unets, updates
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return out


def make_pairs(teacher: str, reg_batch: int, steps: int, work: str) -> str:
    """Enough (noise, output) pairs for `steps` regression batches, made on the embedded Ray: their URI."""
    from dmd_ray.distributed.cluster import init_ray
    from dmd_ray.distributed.pair_job import generate_pairs

    init_ray()
    uri, n_pairs = os.path.join(work, "pairs"), max(16, reg_batch * steps)
    generate_pairs(PairsConfig(teacher=teacher, prompts=BUILTIN_PROMPTS, num_pairs=n_pairs, shard_size=n_pairs, steps=PAIR_STEPS,
                               sampler=PAIR_SAMPLER, out=uri, batch_size=8))
    return uri


def bench_config(args: argparse.Namespace, pairs_uri: str, gpu: bool, **overrides) -> DistillConfig:
    """The job's config for a benchmark row from the options the benchmarks share (teacher, steps, log_every, the
    regression loss, gradient checkpointing, compile): one worker, no checkpoints, samples or export."""
    return DistillConfig(
        teacher=args.teacher, pairs=pairs_uri, pair_sampler=PAIR_SAMPLER, pair_steps=PAIR_STEPS, max_steps=args.steps, num_workers=1, lr=1e-5,
        warmup_steps=10, regression_space=args.regression_space, lpips_backbone=args.lpips_backbone, lpips_pretrained_backbone=False,
        lpips_min_size=args.lpips_min_size, gradient_checkpointing=args.gradient_checkpointing, compile=args.compile, checkpoint_every=0,
        sample_every=0, export=False, log_every=args.log_every, cpus_per_worker=4.0 if gpu else float(os.cpu_count() or 1), **overrides)


def ray_job(cfg: DistillConfig) -> dict:
    from dmd_ray.distributed.distill_driver import distill
    from dmd_ray.distributed.run_records import read_history

    started = time.perf_counter()
    distill(cfg)
    wall = time.perf_counter() - started
    history = read_history(cfg.output)
    profile, profiled = {}, []
    if os.path.exists(os.path.join(cfg.output, "profile.json")):  # the worker's own (profile_steps)
        with open(os.path.join(cfg.output, "profile.json")) as f:
            profile = json.load(f)
        first_profiled, last_profiled = profile.pop("steps")
        profiled = range(first_profiled, last_profiled + 1)
    # steady windows: after the first (compilation), and none holding a profiled step (the profiler slows them)
    steady = [r["step_time_s"] for r in history[1:] if not any(r["step"] - cfg.log_every < s <= r["step"] for s in profiled)]
    times = steady or [r["step_time_s"] for r in history]
    out = {"step_time_s": statistics.median(times), "job_wall_s": wall, **profile}
    first = history[0]  # its window holds the compilation
    out["compile_s"] = max(0.0, first["step"] * (first["step_time_s"] - out["step_time_s"]))
    if "peak_memory_gib" in history[-1]:
        out["peak_memory_gib"] = max(r["peak_memory_gib"] for r in history)
    return out


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--teacher", default="tiny")
    p.add_argument("--dm-batch", type=int, default=8)
    p.add_argument("--reg-batch", type=int, default=4)
    p.add_argument("--steps", type=int, default=30)
    p.add_argument("--zero-stages", type=int, nargs="*", default=[0, 2], help="one Ray Train + DeepSpeed row per stage; none: plain loop only")
    p.add_argument("--regression-space", default="pixel", choices=("pixel", "latent"))
    p.add_argument("--precision", default="bf16", choices=("bf16", "fp32"))
    p.add_argument("--gradient-checkpointing", action="store_true")
    p.add_argument("--compile", default="auto", help="the job's compile setting (auto: on GPU); the plain loop compiles in the first stage's mode")
    p.add_argument("--fused-adamw", default="auto")
    p.add_argument("--skip-guards", default="true", choices=("true", "false"), help="the job's skip_guards: only the differentiating guards after the warm-up")
    p.add_argument("--flat-optimizer", default="true", choices=("false", "true", "both"),
                   help="the job's flat_optimizer (ZeRO-0; on by default); both: the ZeRO-0 row with it off, then a second with it on "
                   "(it finds the first's kernels)")
    p.add_argument("--channels-last", default="false", choices=("auto", "false", "true", "both"),
                   help="the job's channels_last; both: every Ray row without it, then the same rows with it")
    p.add_argument("--log-every", type=int, default=10, help="the losses read from the device every this many steps")
    p.add_argument("--lpips-backbone", default="vgg")
    p.add_argument("--lpips-min-size", type=int, default=224)
    p.add_argument("--skip-plain", action="store_true")
    p.add_argument("--skip-ray", action="store_true", help="the plain loop only, in the numerics and compile mode of the first --zero-stages")
    p.add_argument("--baseline-steps", type=int, default=0, help="steps of the --baselines rows (default: --steps)")
    p.add_argument("--profile-steps", type=int, default=3, help="steps of each row under torch.profiler (GPU busy, kernel launches; the Ray rows "
                   "through the worker's profile_steps, after its warm-up); 0: none")
    p.add_argument("--baselines", action="store_true", help="after the fast rows, the path before issue 14 (eager, per-tensor AdamW, losses read every step): "
                   "a plain-loop row and a Ray row of the first stage, reporting to Ray Train every step as the job did")
    p.add_argument("--json", help="write the results here too")
    args = p.parse_args()
    device = default_device()
    gpu = device.type == "cuda"
    peak: Peak = peak_matmul(device)  # before any model is on the device
    print(peak.label, flush=True)
    work = tempfile.mkdtemp(prefix="bench-distill-")
    pairs_uri = make_pairs(args.teacher, args.reg_batch, args.steps + 2 * args.log_every + 4, work)
    base = bench_config(args, pairs_uri, gpu, dm_batch_size=args.dm_batch, reg_batch_size=args.reg_batch, precision=args.precision,
                        fused_adamw=args.fused_adamw, profile_steps=args.profile_steps, skip_guards=args.skip_guards == "true",
                        flat_optimizer=args.flat_optimizer == "true", channels_last="false" if args.channels_last == "both" else args.channels_last)
    if args.zero_stages:  # the plain loop compiles in the mode of the first Ray row's stage
        base = dataclasses.replace(base, zero_stage=args.zero_stages[0])
    # the path before issue 14 as its baseline: eager networks, per-tensor AdamW, the losses read and reported to Ray Train every step
    # (not profiled: with a log window per step, the profiled steps would be among the timed ones)
    before = dataclasses.replace(base, compile="false", fused_adamw="false", flat_optimizer=False, log_every=1, report_every=1,
                                 max_steps=args.baseline_steps or args.steps, profile_steps=0)
    # (row name, settings, config, whether it is the plain loop). The fast rows first: the plain loop compiles the
    # worker's graphs, which the Ray worker then finds in this machine's compile caches (on CPUs; on an H200 with
    # torch 2.11 it did not, BENCHMARKS.md "fifth round"); a time-boxed run that is cut short loses the baselines,
    # which earlier runs have measured, not the new rows
    runs = [(PLAIN, "fast", base, True)] if not args.skip_plain else []
    ray_stages = [] if args.skip_ray else args.zero_stages
    runs += [(f"ray train + deepspeed ZeRO-{stage}", "fast", base, False) for stage in ray_stages]
    if args.flat_optimizer == "both" and 0 in ray_stages:
        runs += [("ray train + deepspeed ZeRO-0, flat optimizer", "fast-flat", dataclasses.replace(base, flat_optimizer=True), False)]
    if args.channels_last == "both":
        runs += [(f"{name}, channels-last", f"{settings}-channels-last", dataclasses.replace(cfg, channels_last="true"), plain)
                 for name, settings, cfg, plain in runs]
    if args.baselines:
        runs += [(f"{PLAIN}, eager (before)", "before", before, True)] if not args.skip_plain else []
        runs += [(f"ray train + deepspeed ZeRO-{stage}, eager (before)", "before", before, False) for stage in ray_stages[:1]]
    rows: dict[str, dict] = {}
    for name, settings, cfg, plain in runs:
        try:
            if plain:
                row = plain_loop(cfg, pairs_uri, cfg.max_steps, args.profile_steps)
            else:
                stage = int(name.split("ZeRO-")[1][0])
                row = ray_job(dataclasses.replace(cfg, zero_stage=stage, output=os.path.join(work, f"zero{stage}-{settings}")))
        except Exception as e:  # noqa: BLE001 - an OOM at this batch is a result too
            row = {"error": f"{type(e).__name__}: {str(e).splitlines()[0][:200] if str(e) else ''}"}
        rows[name] = {"settings": settings, **row}
        print(f"[bench_distill] {name}: {json.dumps(rows[name])}", flush=True)
        if args.json:  # after every row: a later row that runs out of time keeps the earlier ones
            with open(args.json, "w") as f:
                json.dump({"args": vars(args), "device": device_name(device), "peak_tflops": peak.tflops, "peak": peak.label, "rows": rows}, f, indent=1)

    counted = next((r for r in rows.values() if r.get("flops_per_iteration")), {})
    flops = counted.get("flops_per_iteration")
    samples = args.dm_batch + args.reg_batch
    print(f"\nDMD iteration: teacher {args.teacher}, DM batch {args.dm_batch} + regression batch {args.reg_batch} ({args.regression_space}, "
          f"LPIPS-{args.lpips_backbone} at {args.lpips_min_size}), {args.precision}, gradient checkpointing {args.gradient_checkpointing}, "
          f"{device_name(device)}, {time.strftime('%Y-%m-%d')}")
    print(f"fast rows: compile {args.compile} ({base.compile_mode(device.type) or 'eager'}), fused AdamW {args.fused_adamw}, "
          f"flat optimizer under ZeRO-0 {args.flat_optimizer} (the plain loop: {base.flat_optimizer and base.zero_stage == 0}), channels-last {args.channels_last}, "
          f"losses read every {args.log_every} steps; 'before' rows: eager, per-tensor AdamW, losses read and reported every step")
    print(f"peak: {peak.label}")
    if flops:
        note = " (includes gradient-checkpointing recomputation: the iteration without it ran out of memory)" if counted["flops_include_recompute"] else ""
        print(f"model FLOPs per iteration (FlopCounterMode, one eager plain-loop iteration): {flops / 1e12:.4g} TFLOP, "
              f"{flops / samples / 1e12:.4g} TFLOP per sample (DM and regression together){note}")
    else:
        print("model FLOPs: not counted (--skip-plain)")
    plain = {r["settings"]: r for r in rows.values() if "error" not in r and "flops_per_iteration" in r}
    table = []
    for name, r in rows.items():
        if "error" in r:
            table.append([name, f"failed: {r['error']}"] + [""] * 8)
            continue
        tflops = flops / r["step_time_s"] / 1e12 if flops else None
        same = plain.get(r["settings"], {})
        # GPU busy: the row's profiled GPU time over its unprofiled step time; a Ray row without its own profile (too
        # few steps to reach it) borrows the plain loop's GPU time, marked ~
        gpu_s = r.get("gpu_s_per_iteration", same.get("gpu_s_per_iteration"))
        busy = f"{'' if 'gpu_s_per_iteration' in r else '~'}{100 * gpu_s / r['step_time_s']:.0f}%" if gpu_s else "-"
        table.append([
            name, f"{r['step_time_s']:.3f}", f"{samples / r['step_time_s']:.2f}", f"{tflops:.3g}" if tflops else "-", peak.utilisation(tflops),
            busy, f"{r['launches_per_iteration']:.0f}" if "launches_per_iteration" in r else "-",
            f"{r['peak_memory_gib']:.1f}" if "peak_memory_gib" in r else "-",
            f"{same['step_time_s'] / r['step_time_s']:.2f}x" if same else "-", f"{r['compile_s']:.0f}",
        ])
    print_table(["row", "s/iteration", "samples/s", "model TFLOP/s", "MFU", "GPU busy", "launches/it", "peak GiB",
                 "iterations/s vs the plain loop (same settings)", "first steps beyond steady s (compile)"], table)
    for name, r in rows.items():
        for key, what in (("top_gpu_ms", "GPU"), ("top_cpu_ms", "host")):
            if r.get(key):
                print(f"{what} time per iteration, {name}: " + ", ".join(f"{op} {ms} ms ({calls} calls)" for op, ms, calls in r[key]))
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"args": vars(args), "device": device_name(device), "peak_tflops": peak.tflops, "peak": peak.label,
                       "flops_per_iteration": flops, "rows": rows}, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
