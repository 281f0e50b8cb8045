"""The Ray Train worker of distillation: set-up, the DMD loop, export.

Each worker holds
  - the frozen teacher (real score, text encoder, VAE) in bf16, as plain modules;
  - the generator and the fake score, each a copy of the teacher's UNet inside its own DeepSpeed engine (ZeRO 0-3,
    bf16 with fp32 master weights, AdamW, warm-up, gradient clipping);
  - its share of the pairs (a PairStream over its Parquet shards).
One iteration is one call of the DMDStep (method/objective.py): a generator update on dm + lambda_reg * regression,
then `fake_updates` fake-score updates on detached generator samples. Each engine's backward touches only its own
parameters. Checkpoints, sample grids and the metrics history are run_records.py's.
"""
from __future__ import annotations

import contextlib
import copy
import functools
import json
import math
import os
import time
import types
from typing import NamedTuple

import torch

from dmd_ray import compile_cache
from dmd_ray.config import DistillConfig
from dmd_ray.data import storage
from dmd_ray.distributed.cluster import TrainingDiverged, past_deadline
from dmd_ray.distributed.distill_driver import DistillPlan
from dmd_ray.distributed.pair_job import PairStream
from dmd_ray.distributed.profiling import StepProfiler
from dmd_ray.distributed.run_records import RunRecords, generated_images, worker_print
from dmd_ray.method.objective import LogWindow
from dmd_ray.method.optim import FlatParameters, WeightAverage, warmup_schedule
from dmd_ray.method.transfer import to_device
from dmd_ray.sd.conditioning import PromptConditions
from dmd_ray.sd.dmd import build_step, gan_classifier
from dmd_ray.sd.fake_score import FILE as FAKE_SCORE_FILE, load_fake_score, save_fake_score
from dmd_ray.sd.real_bank import RealLatentBank
from dmd_ray.sd.resolve import load_teacher, resolve_generator
from dmd_ray.sd.teacher import UNetDenoiser


def deepspeed_config(cfg: DistillConfig, micro_batch: int) -> dict:
    """ZeRO 1-3 keep DeepSpeed's bf16 mode (bf16 weights, fp32 master copies in its ZeRO optimizer, gradients
    clipped there). ZeRO-0 shards nothing, so it trains fp32 weights under torch autocast with the client optimizer
    itself: no BF16_Optimizer with its per-parameter gradient hooks and copies, and `engine_update` clips with torch's
    multi-tensor kernels instead of DeepSpeed's per-parameter loop (on the 3.7M-parameter demo UNet those
    per-parameter kernels were most of an iteration's 18,000 launches; BENCHMARKS.md)."""
    zero0 = cfg.zero_stage == 0
    config = {
        "train_micro_batch_size_per_gpu": micro_batch,
        "gradient_accumulation_steps": 1,
        "gradient_clipping": 0.0 if zero0 else cfg.grad_clip,
        "zero_optimization": {"stage": cfg.zero_stage, "overlap_comm": False, "contiguous_gradients": True},
        "zero_allow_untested_optimizer": True,  # torch's own AdamW, passed in: ZeRO 0-3 all accept it
        "steps_per_print": 10**9,
        "wall_clock_breakdown": False,
    }
    if cfg.precision == "bf16" and zero0:
        config["torch_autocast"] = {"enabled": True, "dtype": "bfloat16"}
    elif cfg.precision == "bf16":
        config["bf16"] = {"enabled": True}
    return config


def engine(cfg: DistillConfig, unet, lr: float, micro_batch: int, device: torch.device, world_size: int = 1, classifier=None,
           init_weights: str = ""):
    """A DeepSpeed engine training a copy of the teacher's UNet (or the weights of `init_weights`, a fake score an
    earlier run wrote): torch's AdamW (fused on GPU: one kernel for all parameters, and no JIT-compiled DeepSpeed op,
    which costs 40 s on a CPU node), the shared warm-up schedule, the network compiled on GPU."""
    import deepspeed

    unet = copy.deepcopy(unet).float().train().requires_grad_(True)
    if cfg.gradient_checkpointing:
        unet.enable_gradient_checkpointing()
    model = UNetDenoiser(unet, classifier)
    if init_weights:
        worker_print(f"[distill] fake score starts from {init_weights}: {load_fake_score(model, init_weights)}")
    model = model.to(device)
    flat = FlatParameters(model.parameters()) if cfg.zero_stage == 0 and cfg.flat_optimizer else None
    optimizer = torch.optim.AdamW([flat.flat] if flat else model.parameters(), lr=lr, betas=(0.9, 0.999), eps=1e-8,
                                  weight_decay=cfg.weight_decay, fused=cfg.fused_adamw_on(device.type) or None)
    schedule = lambda optimizer: warmup_schedule(optimizer, max(1, cfg.warmup_steps))  # noqa: E731
    ds_engine = deepspeed.initialize(model=model, optimizer=optimizer, config=deepspeed_config(cfg, micro_batch), lr_scheduler=schedule)[0]
    if cfg.zero_stage == 0:
        # after every step DeepSpeed's ZeRO-0 engine drops the gradients through module.named_parameters(), a walk of
        # the module tree: 0.65-0.72 ms per engine and step for the demo UNet on a CPU core, against 0.02-0.03 ms for
        # the list taken once (BENCHMARKS.md; the GPU iteration is bound by such host time)
        ds_engine.zero_grad = flat.drop_gradients if flat else functools.partial(drop_gradients, [p for p in model.parameters()])
        ds_engine.flat_parameters = flat  # engine_update gathers and clips the flat gradient
        if world_size == 1:
            ds_engine.enable_backward_allreduce = False  # one rank: DeepSpeed would still flatten, "reduce" and copy back every gradient
        if flat and cfg.channels_last_on(device.type):  # after DeepSpeed's set-up (see relayout)
            flat.relayout(torch.channels_last, ds_engine.optimizer)
    compile_network(unet, cfg.compile_mode(device.type))
    model.compile_classifier(cfg.compile_mode(device.type))  # DMD2's GAN head reads the bottleneck through its own graph
    return ds_engine


def drop_gradients(params: list[torch.nn.Parameter]) -> None:
    for param in params:
        param.grad = None


def initial_generator(cfg: DistillConfig, teacher) -> torch.nn.Module:
    """The network the generator starts from: the teacher's, or the exported student of `init_generator` (its
    architecture checked against the teacher's by the driver)."""
    if not cfg.init_generator:
        return teacher.unet
    return load_teacher(resolve_generator(cfg.init_generator, cfg.cache_dir or None)).unet


class Autocast(torch.nn.Module):
    """`module` called under bf16 autocast, as a ZeRO-0 engine's forward calls it."""

    def __init__(self, module: torch.nn.Module, device_type: str):
        super().__init__()
        self.module, self.device_type = module, device_type

    def forward(self, *args, **kwargs):
        with torch.autocast(self.device_type, dtype=torch.bfloat16):
            return self.module(*args, **kwargs)


def bare_module(engine, cfg: DistillConfig, device: torch.device) -> torch.nn.Module:
    """The engine's network without the engine, in the precision the engine runs it: for a backward that passes
    through it to its inputs and is not the engine's own (DeepSpeed refuses those: the GAN's generator term)."""
    return Autocast(engine.module, device.type) if deepspeed_config(cfg, 1).get("torch_autocast") else engine.module


def _own_forward(self, *args, **kwargs):
    return type(self).forward(self, *args, **kwargs)


def compile_network(module: torch.nn.Module, mode: str | None) -> None:
    """torch.compile in place (Module.compile keeps parameter names: checkpoints and exports are unchanged).
    Shapes are static per run (the DM, regression and fake batches are fixed); sample grids run eager
    (RunRecords.sample_grid), so their batch does not compile a second graph.

    Each network is compiled through a forward of its own (a copy of `_own_forward`'s code object, the frame that
    Dynamo traces), not through its class's forward, which the teacher, generator and fake score share: Dynamo keeps
    its cache entries per code object, and with one for all three, every call's lookup also ran the full guards of
    the other networks' entries. A full check stores the thread's dispatch state (autocast on or off) in the entry,
    and the entry's tensor guards compare dispatch keys against that stored state, also in the cheap check of
    `skip_guards` (step_guards), which never stores it again. An entry last scanned by a call under the other
    autocast state (the ZeRO-0 engines' networks run under bf16 autocast, the teacher without) then failed its
    dispatch-key check at every call: "Recompilation triggered with skip_guard_eval_unsafe stance". Each network
    is always called under one autocast state, so the state its entries store is always the right one."""
    if mode is not None:
        compile_cache.stable_keys()  # a resumed run, or another worker, finds the kernels the first one compiled
        module.forward = types.MethodType(types.FunctionType(_own_forward.__code__.replace(), globals(), "forward"), module)
        module.compile(mode=mode, dynamic=False)


def worker_threads(cfg: DistillConfig) -> int:
    return max(1, int(cfg.cpus_per_worker))


# a compiled run traces its graphs at the first step and records their CUDA graphs by the third
COMPILE_STEPS = 3


def step_guards(cfg: DistillConfig, warm: bool):
    """Around one step of a compiled run with `skip_guards`: once its first steps have compiled every graph the step
    calls, torch.compile checks only the guards that tell those cached graphs apart, not all of them (on each call of
    a compiled network the full guards check every parameter: about 1 ms for the demo UNet on a CPU core, 3.8 ms of
    host time per iteration on an H200, BENCHMARKS.md). Not under ZeRO-3, whose hooks change the parameters between
    calls; probes and sample grids run outside it, fully guarded. What this needs from the step: whatever changes
    between steps reaches the compiled networks as a tensor, never as a Python number (a changed number would not be
    checked, and the graph traced for the old one would run), and no graph first needed after the warm-up steps."""
    if cfg.skip_guards and warm and cfg.zero_stage < 3:
        return torch.compiler.set_stance(skip_guard_eval_unsafe=True)
    return contextlib.nullcontext()


def compile_frozen(teacher, objective, mode: str | None, channels_last: bool = False) -> None:
    """The frozen networks of the step compiled (and their weights channels-last, where asked): the teacher's UNet
    (real score) and, for the pixel regression loss, the VAE decoder and the LPIPS network that the generator's
    gradient flows back through."""
    networks = [teacher.unet]
    if objective.regression is not None and isinstance(objective.regression.distance, torch.nn.Module):
        networks += [teacher.vae.decoder, objective.regression.distance]
    for network in networks:
        if channels_last:
            network.to(memory_format=torch.channels_last)
        compile_network(network, mode)


def compile_cache_uri(cfg: DistillConfig) -> str:
    return storage.join(cfg.output, "compile_cache.bin") if cfg.compile_cache == "auto" else cfg.compile_cache


def engine_update(engine, grad_clip: float = 0.0):
    """An `Update` through a DeepSpeed engine. Under ZeRO-0 (DeepSpeed's clipping off, see deepspeed_config) the
    gradients are clipped here, after the engine's all-reduce, and the norm stays on the device."""
    flat = getattr(engine, "flat_parameters", None)  # flat_optimizer: one buffer of weights and one of gradients
    params = [p for p in engine.module.parameters() if p.requires_grad]
    own_clip = engine.zero_optimization_stage() == 0

    def update(loss):
        engine.backward(loss)
        if flat:
            flat.gather_gradients()
            norm = flat.clip_gradients(grad_clip or math.inf)
        else:
            norm = torch.nn.utils.clip_grad_norm_(params, grad_clip or math.inf, foreach=True) if own_clip else None
        engine.step()
        return norm if own_clip else engine.get_global_grad_norm()  # None where the engine does not compute it

    return update


def gathered_state_dict(engine, zero_stage: int) -> dict:
    """The engine's module weights, whole, on every rank (ZeRO-3 shards them: gather collectively)."""
    import deepspeed

    module = engine.module
    if zero_stage == 3:
        with deepspeed.zero.GatheredParameters(list(module.parameters()), modifier_rank=None):
            return {k: v.detach().clone().cpu() for k, v in module.state_dict().items()}
    return {k: v.detach().cpu() for k, v in module.state_dict().items()}


class StepActions(NamedTuple):
    sample: bool  # a sample grid
    checkpoint: bool  # a checkpoint (reported to Ray Train with the metrics)
    evaluate: bool  # the quality probe
    report: bool  # ray.train.report without a checkpoint
    log: bool  # the losses read from the device, metrics.jsonl, a log line; true whenever any of the above is


def step_actions(cfg: DistillConfig, step: int, last: bool) -> StepActions:
    """What the loop does after `step` (counted from 1), the same on every rank (checkpoints and reports are
    collectives). ray.train.report is a blocking handshake: it waits until Ray Train's controller has taken the
    previous report, and the controller polls every 2 s (Ray 2.60), so the loop reports only with checkpoints, at the
    last step and every `report_every` steps, never on every log step."""
    def every(n: int) -> bool:
        return bool(n and (step % n == 0 or last))

    checkpoint, evaluate = every(cfg.checkpoint_every), every(cfg.eval_every)
    report = not checkpoint and (last or bool(cfg.report_every and step % cfg.report_every == 0))
    return StepActions(sample=every(cfg.sample_every), checkpoint=checkpoint, evaluate=evaluate, report=report,
                       log=checkpoint or evaluate or report or step % cfg.log_every == 0)


def train_loop_per_worker(config: dict) -> None:
    """Runs on every Ray Train worker (DeepSpeed and Ray Train are imported here, not on the driver)."""
    import ray.train
    import ray.train.torch
    from ray.data import DataContext

    cfg: DistillConfig = config["cfg"]
    plan: DistillPlan = config["plan"]
    probe = config.get("probe")  # judges the generator's images every cfg.eval_every steps (distill_driver.distill)
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    device = ray.train.torch.get_device()
    DataContext.get_current().execution_options.preserve_order = True  # deterministic pair order per worker
    DataContext.get_current().enable_progress_bars = False
    # the worker's CPUs, on a GPU node too (not Ray's OMP_NUM_THREADS default): Inductor (torch 2.14) keys compiled
    # graphs that touch CPU tensors by this count, and bench_distill's plain loop sets the same to share them
    torch.set_num_threads(worker_threads(cfg))

    # ---- set-up: the frozen teacher, two engines, the step, the state of a resumed run
    teacher = load_teacher(cfg.teacher, cache_dir=cfg.cache_dir or None)
    gen_engine = engine(cfg, initial_generator(cfg, teacher), cfg.lr, cfg.local_dm_batch + cfg.local_reg_batch, device, world)
    fake_engine = engine(cfg, teacher.unet, cfg.fake_lr or cfg.lr, cfg.local_dm_batch, device, world, gan_classifier(cfg, teacher.unet),
                         cfg.init_fake_score)
    teacher.to(device=device, dtype=torch.bfloat16 if cfg.precision == "bf16" else torch.float32)
    conditions = PromptConditions(teacher, list(plan.prompts), plan.latent_shape, device)
    rng = torch.Generator("cpu").manual_seed(cfg.seed * 1000 + rank)
    real = (RealLatentBank(teacher, conditions, config["real_images"], cfg.gan_real_size, plan.resolution, cfg.seed)
            if cfg.gan_weight and cfg.gan_real == "renders" else None)
    step_fn = build_step(cfg, teacher, conditions, gen_engine, fake_engine, engine_update(gen_engine, cfg.grad_clip), engine_update(fake_engine, cfg.grad_clip),
                         rng, cfg.local_dm_batch, device, bare_module(fake_engine, cfg, device), real.draw if real else None)
    compile_frozen(teacher, step_fn.objective, cfg.compile_mode(device.type), cfg.channels_last_on(device.type))
    compiled = cfg.compile_mode(device.type) is not None
    cache_uri = compile_cache_uri(cfg) if compiled else ""
    cache_loaded = compile_cache.load(cache_uri)
    generator = step_fn.objective.generator
    average = WeightAverage(gen_engine.module, cfg.ema_decay) if cfg.ema_decay else None  # what ships, when kept
    averaged = average.swapped_in if average else contextlib.nullcontext  # the probe and grids see what ships
    records = RunRecords(cfg, rank, world)
    step, stream_state = records.resume(gen_engine, fake_engine, rng, average)
    stream = PairStream(plan.pairs, cfg.local_reg_batch, rank, world, cfg.seed, stream_state)
    if step == 0 and cfg.sample_every:
        records.sample_grid("step_0000000", generator, teacher, plan.latent_shape, device)

    # ---- the loop: the host queues work and waits for the device only at log, sample and checkpoint steps
    deadline = config["deadline"]  # the job's (time_limit_minutes), set on the driver
    window_start, window_steps = time.perf_counter(), 0
    window = LogWindow()  # the logged losses and norms, summed on the device until a log step reads their means
    first_step, loop_start = step, time.perf_counter()
    profiler = StepProfiler(first_step + COMPILE_STEPS, cfg.profile_steps, device) if cfg.profile_steps and rank == 0 else None
    last = step >= cfg.max_steps  # a finished run that is rerun only exports again
    while not last:
        maybe_kill_for_test(cfg, step, rank)
        if profiler:
            profiler.before(step)
        lrs = {"lr_generator": gen_engine.get_lr()[0], "lr_fake": fake_engine.get_lr()[0]}  # the rates this step uses
        batch = next(stream)
        # the pairs' prompts condition the regression, and the GAN's real samples unless those come from the bank
        needs_pair_cond = step_fn.objective.uses_regression or (step_fn.objective.gan is not None and real is None)
        pair_cond = conditions.encode(batch["prompt"]) if needs_pair_cond else None
        if compiled:
            torch.compiler.cudagraph_mark_step_begin()  # CUDA graphs: the previous iteration's outputs may be reused
        with step_guards(cfg, compiled and step >= first_step + COMPILE_STEPS):
            logs = step_fn(to_device(batch["noise"], device, torch.float32), pair_cond, to_device(batch["target"], device, torch.float32))
        window.add(logs)
        if average:
            average.update(step + 1 if cfg.ema_warmup else None)
        if profiler and (profile := profiler.after(step)):
            write_profile(cfg, profile, step + 1)
        step, window_steps = step + 1, window_steps + 1
        if compiled and step == first_step + COMPILE_STEPS:
            if device.type == "cuda":
                torch.cuda.synchronize()
            saved = compile_cache.save(cache_uri) if rank == 0 and not cache_loaded else 0
            if rank == 0:
                worker_print(f"[distill] compilation: {time.perf_counter() - loop_start:.1f} s for the first 3 steps ({compile_cache.summary()}; "
                             f"compile cache {'loaded' if cache_loaded else 'not found'}{f'; {saved / 2**20:.1f} MiB saved to {cache_uri}' if saved else ''})")
        last = step >= cfg.max_steps or bool(cfg.time_limit_minutes and step % 10 == 0 and past_deadline(deadline, device, time.time))
        if last and step < cfg.max_steps and rank == 0:
            worker_print(f"[distill] time limit of {cfg.time_limit_minutes} minutes reached at step {step} of {cfg.max_steps}: stopping here")
        todo = step_actions(cfg, step, last)
        if todo.sample:
            with averaged():
                records.sample_grid(f"step_{step:07d}", generator, teacher, plan.latent_shape, device)
        if not todo.log:
            continue
        finite = window.finite(device)
        if world > 1:  # every rank stops together, whichever rank diverged
            flag = finite.int()
            torch.distributed.all_reduce(flag, op=torch.distributed.ReduceOp.MIN)
            finite = flag.bool()
        if not bool(finite):
            raise TrainingDiverged(f"a loss or gradient norm became NaN or infinite in the {window_steps} steps up to step {step}: "
                                   "lower --lr or --fake-lr, or resume from an earlier checkpoint with another config")
        # wall time per step since the previous log step was timed: these steps and that log step's own work (its
        # probe, checkpoint or report), so that the figure is what the run really takes
        now = time.perf_counter()
        seconds, window_start = (now - window_start) / window_steps, now
        metrics = {"step": step, **window.read(), **lrs, "step_time_s": seconds, "samples_per_s": (cfg.dm_batch_size + cfg.reg_batch_size) / seconds}
        if device.type == "cuda":
            metrics["peak_memory_gib"] = torch.cuda.max_memory_allocated() / 2**30
        if todo.evaluate:
            prompts, seeds = probe.rows()
            with averaged():
                images = generated_images(generator, teacher, prompts, seeds, plan.latent_shape, device)
            if rank == 0:
                metrics.update({f"eval_{k}": float(v) for k, v in probe(images, prompts).items()})
        records.record(metrics, echo=True)
        if todo.checkpoint:
            records.save_checkpoint(step, metrics, gen_engine, fake_engine, rng, stream, average)
        elif todo.report:
            ray.train.report(metrics)
        window_steps = 0
    stream.close()
    records.close()

    # ---- export (weights gathered on every rank under ZeRO-3; rank 0 writes), and the fake score a later run can
    # continue from (init_fake_score)
    if cfg.export:
        state = gathered_state_dict(gen_engine, cfg.zero_stage)
        if average:
            state.update({k: v.cpu() for k, v in average.shadow.items()})
        fake_state = gathered_state_dict(fake_engine, cfg.zero_stage) if step_fn.objective.needs_fake_score else None
        if rank == 0 and fake_state is not None:
            uri = storage.join(cfg.output, FAKE_SCORE_FILE)
            size = save_fake_score(fake_state, uri, getattr(torch, cfg.export_dtype), cfg.gan_features if cfg.gan_weight else "")
            worker_print(f"[distill] fake score written to {uri} ({size / 2**20:.1f} MiB; --init-fake-score continues from it)")
        if rank == 0:
            from dmd_ray.sd.export import export_generator

            unet = type(teacher.unet).from_config(teacher.unet.config)  # not a deepcopy: the teacher's may be compiled
            unet.load_state_dict({k.removeprefix("unet."): v.float().cpu() for k, v in state.items()})
            uri = export_generator(teacher.to("cpu", torch.float32), unet, storage.join(cfg.output, "export"), generator.timestep,
                                   {"teacher": cfg.teacher, "steps": step, "guidance_scale": cfg.guidance_scale, "recipe": cfg.recipe()}, dtype=getattr(torch, cfg.export_dtype),
                                   timesteps=getattr(generator, "timesteps", None), sampler=getattr(generator, "sampler", "lcm"))
            worker_print(f"[distill] export written to {uri}")
    if world > 1:
        torch.distributed.barrier()


def write_profile(cfg: DistillConfig, profile: dict, last_step: int) -> None:
    """<output>/profile.json and a log line: the summary of the profiled steps, numbered as metrics.jsonl numbers them."""
    uri = storage.join(cfg.output, "profile.json")
    storage.write_bytes(uri, json.dumps({"steps": [last_step + 1 - cfg.profile_steps, last_step], **profile}).encode())
    gpu = (f"{profile['gpu_s_per_iteration'] * 1e3:.1f} ms of GPU time and {profile['launches_per_iteration']:.0f} kernel launches per iteration, "
           if "gpu_s_per_iteration" in profile else "")
    worker_print(f"[distill] profile of {cfg.profile_steps} steps: {gpu}{profile['wall_s_per_iteration'] * 1e3:.1f} ms per iteration under the "
                 f"profiler; most host time (ms): {profile['top_cpu_ms'][:4]} (all in {uri})")


def maybe_kill_for_test(cfg: DistillConfig, step: int, rank: int) -> None:
    """Tests' fault injection: kills rank `debug_kill_rank` at `debug_kill_at_step`, once per output."""
    if step != cfg.debug_kill_at_step or rank != cfg.debug_kill_rank:
        return
    marker = storage.join(cfg.output, ".debug_kill_done")
    if not storage.exists(marker):
        storage.write_bytes(marker, b"killed once")
        worker_print(f"[distill] debug: killing rank {rank} at step {step}")
        os.kill(os.getpid(), 9)
