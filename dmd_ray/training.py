"""Distributed DMD: the Ray Train worker loop around two DeepSpeed engines (generator, fake score).

This is the adapter between the framework-free core (dmd_ray.distill.DMDObjective and the losses) and Ray Train +
DeepSpeed. Each worker holds:
  - the frozen teacher (real score, text encoder, VAE) in bf16, as plain modules;
  - the generator and the fake score, each a copy of the teacher's UNet inside its own DeepSpeed engine (ZeRO 0-3,
    bf16 with fp32 master weights, AdamW, warm-up, gradient clipping);
  - its share of the pairs dataset (a PairStream over its Parquet shards).
One iteration (DMD Alg. 1): a generator update on dm + lambda_reg * regression, then `fake_updates` fake-score
updates on detached generator samples. Each engine's backward touches only its own parameters.
"""
from __future__ import annotations

import copy
import dataclasses
import json
import os
import random
import tempfile
import time
from dataclasses import dataclass

import torch

from dmd_ray import pairs, storage

DEFAULT_SAMPLE_PROMPTS = (
    "a small red circle on a blue background",
    "a large green square on a white background",
    "a yellow triangle on a black background",
    "a small blue square on a yellow background",
)


def past_deadline(deadline: float, device: torch.device) -> bool:
    """True when any worker is past `deadline` (time.monotonic()): all-reduced, so that every worker of a
    distributed run stops at the same step."""
    late = torch.tensor([float(time.monotonic() > deadline)], device=device)
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.all_reduce(late, op=torch.distributed.ReduceOp.MAX)
    return bool(late.item())


@dataclass
class DistillConfig:
    """Config of `jobs/distill.py` (every key can be set in YAML or as --key-name on the command line)."""

    # what to distil, and where things go
    teacher: str = "tiny"  # built-in name, local diffusers folder, s3:// URI or hub id
    prompts: str = ""  # .txt/.csv/.jsonl/.parquet, local or s3://; "" -> the built-in shapes prompts
    pairs: str = ""  # an existing pairs dataset; "" -> generate pairs into <output>/pairs first
    output: str = "runs/distill"  # local folder or s3://bucket/prefix: checkpoints, samples, logs, export
    run_name: str = "train"  # Ray Train run name under <output>; a rerun with the same name resumes
    cache_dir: str = ""  # where s3:// teachers are cached
    # pair generation (when `pairs` is empty)
    num_pairs: int = 256
    pair_sampler: str = "pndm"
    pair_steps: int = 50
    pair_shard_size: int = 64
    pair_batch_size: int = 16  # pairs per sampler call (small models on a GPU want hundreds: they are launch-bound)
    pair_gpus_per_actor: float = -1.0  # -1: 1 when the cluster has GPUs at the start, else 0 (set 1 for autoscaling GPU clusters)
    # the method
    guidance_scale: float = 3.0  # real score's classifier-free guidance (DMD: 3 for FID, 8 for visual quality)
    lambda_reg: float = 0.25  # 0: the "without regression" ablation
    dm_weight: float = 1.0  # 0: the "without distribution matching" ablation (regression only; no fake score updates)
    t_min: float = 0.02  # DM-loss timesteps, as fractions of T
    t_max: float = 0.98
    generator_timestep: int = -1  # -1: T - 1 (999 for SD)
    fake_updates: int = 1  # fake-score updates per generator update (DMD2's TTUR: 5-10)
    regression_space: str = "pixel"  # "pixel": decode both sides with the VAE, LPIPS; "latent": L2 on latents
    lpips_backbone: str = "vgg"  # DMD used VGG
    lpips_pretrained_backbone: bool = True  # False: random backbone, the package's calibrated heads (offline)
    lpips_min_size: int = 224  # images are upsampled to this before LPIPS (DMD: 224)
    resolution: int = 0  # pixels; 0: the teacher's default
    # optimisation (DMD: AdamW, wd 0.01, betas (0.9, 0.999), 500 warm-up steps, clip 10, lr 1e-5 for SD 1.5)
    max_steps: int = 1000
    time_limit_minutes: float = 0.0  # > 0: stop (checkpoint, samples, export) at this wall time even before max_steps
    dm_batch_size: int = 8  # global, split over workers
    reg_batch_size: int = 4  # global, split over workers
    lr: float = 1e-5
    fake_lr: float = 0.0  # 0: same as lr
    weight_decay: float = 0.01
    warmup_steps: int = 500
    grad_clip: float = 10.0
    precision: str = "bf16"  # bf16 (fp16 diverges, DMD2) or fp32
    zero_stage: int = 2
    gradient_checkpointing: bool = False
    # scale
    num_workers: int = 1
    use_gpu: str = "auto"  # auto | true | false
    cpus_per_worker: float = 1.0
    gpus_per_worker: float = 1.0  # < 1 lets several small runs share one GPU (e.g. ablations side by side)
    # checkpoints, logs, samples
    checkpoint_every: int = 100  # steps; 0: no checkpoints (nothing to resume from)
    keep_checkpoints: int = 2
    max_failures: int = 2
    log_every: int = 1
    sample_every: int = 100  # steps; 0: no sample grids
    export: bool = True  # write <output>/export at the end
    export_dtype: str = "float32"  # the exported weights: float32, or float16 (half the size; what serving runs on GPUs)
    sample_prompts: tuple[str, ...] = DEFAULT_SAMPLE_PROMPTS
    seed: int = 0
    # testing: kill rank `debug_kill_rank` at this step of the first attempt (-1: never)
    debug_kill_at_step: int = -1
    debug_kill_rank: int = 0

    @property
    def local_dm_batch(self) -> int:
        return self.dm_batch_size // self.num_workers

    @property
    def local_reg_batch(self) -> int:
        return self.reg_batch_size // self.num_workers


class ConfigProblem(ValueError):
    pass


def check_config(cfg: DistillConfig) -> None:
    """The checks that need no I/O: values, ranges and batch arithmetic."""
    problems = []
    if cfg.time_limit_minutes < 0:
        problems.append(f"time_limit_minutes must be >= 0, got {cfg.time_limit_minutes}")
    if cfg.export_dtype not in ("float32", "float16", "bfloat16"):
        problems.append(f"export_dtype must be float32, float16 or bfloat16, got {cfg.export_dtype!r}")
    if cfg.gpus_per_worker <= 0 or (cfg.gpus_per_worker > 1 and cfg.gpus_per_worker != int(cfg.gpus_per_worker)):
        problems.append(f"gpus_per_worker must be a fraction in (0, 1] or a whole number, got {cfg.gpus_per_worker}")
    if cfg.zero_stage not in (0, 1, 2, 3):
        problems.append(f"zero_stage must be 0, 1, 2 or 3, got {cfg.zero_stage}")
    if cfg.num_workers < 1:
        problems.append(f"num_workers must be >= 1, got {cfg.num_workers}")
    else:
        for name in ("dm_batch_size", "reg_batch_size"):
            value = getattr(cfg, name)
            if value < cfg.num_workers or value % cfg.num_workers:
                problems.append(f"{name} {value} does not divide over {cfg.num_workers} workers (it is the global batch: use a multiple of num_workers)")
    if cfg.precision not in ("bf16", "fp32"):
        problems.append(f"precision must be bf16 or fp32, got {cfg.precision!r} (fp16 diverges, see DMD2)")
    if not 0.0 <= cfg.t_min <= cfg.t_max <= 1.0:
        problems.append(f"need 0 <= t_min <= t_max <= 1, got t_min {cfg.t_min}, t_max {cfg.t_max}")
    if cfg.dm_weight < 0 or cfg.lambda_reg < 0 or (cfg.dm_weight == 0 and cfg.lambda_reg == 0):
        problems.append(f"dm_weight and lambda_reg must be >= 0 and not both 0 (the generator would learn nothing), got {cfg.dm_weight} and {cfg.lambda_reg}")
    if cfg.regression_space not in ("pixel", "latent"):
        problems.append(f"regression_space must be pixel or latent, got {cfg.regression_space!r}")
    if cfg.use_gpu not in ("auto", "true", "false"):
        problems.append(f"use_gpu must be auto, true or false, got {cfg.use_gpu!r}")
    for name in ("max_steps", "fake_updates", "log_every", "num_pairs"):
        if getattr(cfg, name) < 1:
            problems.append(f"{name} must be >= 1, got {getattr(cfg, name)}")
    for name in ("checkpoint_every", "sample_every"):
        if getattr(cfg, name) < 0:
            problems.append(f"{name} must be >= 0 (0 turns it off), got {getattr(cfg, name)}")
    if cfg.lr <= 0 or cfg.fake_lr < 0:
        problems.append("lr must be positive and fake_lr non-negative")
    if cfg.lambda_reg < 0:
        problems.append(f"lambda_reg must be >= 0, got {cfg.lambda_reg}")
    if cfg.guidance_scale < 1:
        problems.append(f"guidance_scale must be >= 1, got {cfg.guidance_scale}")
    if problems:
        raise ConfigProblem("; ".join(problems))


def check_storage_and_data(cfg: DistillConfig, prompts: list[str]) -> dict:
    """The checks that read storage: teacher, output location, pairs (shape and shard count). Returns the facts
    the job needs (latent shape, resolution, pairs location)."""
    from dmd_ray.models import describe_teacher

    info = describe_teacher(cfg.teacher, cfg.cache_dir or None)
    resolution = cfg.resolution or info.default_resolution
    latent_shape = info.latent_shape(resolution)
    if cfg.generator_timestep >= 1000:
        raise ConfigProblem(f"generator_timestep {cfg.generator_timestep} is outside the teacher's [0, 999]")
    storage.check_access(cfg.output, write=True)
    _check_resume_world_size(cfg)
    pairs_uri = cfg.pairs or storage.join(cfg.output, "pairs")
    if cfg.pairs:
        storage.check_access(cfg.pairs, write=False)
        manifest = pairs.load_manifest(cfg.pairs)
        if manifest is None:
            raise ConfigProblem(f"pairs {cfg.pairs!r} holds no pairs dataset (no {pairs.MANIFEST}); leave pairs empty to generate them")
        theirs = tuple(manifest["config"]["latent_shape"])
        if theirs != tuple(latent_shape):
            raise ConfigProblem(f"pairs {cfg.pairs!r} hold latents of shape {list(theirs)}, but teacher {cfg.teacher!r} at resolution {resolution} makes {list(latent_shape)}")
        pairs.shard_uris(cfg.pairs)  # raises if incomplete
        if manifest["num_shards"] < cfg.num_workers:
            raise ConfigProblem(f"pairs {cfg.pairs!r} have {manifest['num_shards']} shards for {cfg.num_workers} workers: each worker needs at least one")
    return {"latent_shape": list(latent_shape), "resolution": resolution, "pairs": pairs_uri, "prediction_type": info.prediction_type}


def _check_resume_world_size(cfg: DistillConfig) -> None:
    """A rerun resumes from the run's latest checkpoint. Under ZeRO 1-3 each worker's checkpoint holds its partition
    of the optimizer state, and DeepSpeed (0.19) refuses to load them into another number of workers: say so before
    any worker starts."""
    run_dir = storage.join(cfg.output, cfg.run_name)
    checkpoints = [name for name in storage.list_files(run_dir, folders=True) if name.startswith("checkpoint_step")]
    if not checkpoints:
        return
    state = json.loads(storage.read_bytes(storage.join(run_dir, checkpoints[-1], "trainer_state.json")))
    saved_stage = state.get("config", {}).get("zero_stage", cfg.zero_stage)
    if state["world_size"] != cfg.num_workers and max(saved_stage, cfg.zero_stage) >= 1:
        raise ConfigProblem(
            f"{run_dir} resumes from {checkpoints[-1]}, written by {state['world_size']} worker(s) under ZeRO-{saved_stage}; DeepSpeed cannot "
            f"re-partition ZeRO optimizer states over {cfg.num_workers} worker(s). Resume with --num-workers {state['world_size']}, "
            "or start a new run (--run-name or --output)"
        )


def pairs_config(cfg: DistillConfig, prompts_uri: str, out: str) -> pairs.PairsConfig:
    return pairs.PairsConfig(
        teacher=cfg.teacher, prompts=prompts_uri, num_pairs=cfg.num_pairs, out=out, sampler=cfg.pair_sampler, steps=cfg.pair_steps,
        guidance_scale=cfg.guidance_scale, resolution=cfg.resolution, seed=cfg.seed, shard_size=cfg.pair_shard_size, cache_dir=cfg.cache_dir,
        batch_size=cfg.pair_batch_size, gpus_per_actor=cfg.pair_gpus_per_actor,
    )


def deepspeed_config(cfg: DistillConfig, lr: float, micro_batch: int) -> dict:
    return {
        "train_micro_batch_size_per_gpu": micro_batch,
        "gradient_accumulation_steps": 1,
        "gradient_clipping": cfg.grad_clip,
        "bf16": {"enabled": cfg.precision == "bf16"},
        "zero_optimization": {"stage": cfg.zero_stage, "overlap_comm": False, "contiguous_gradients": True},
        # torch's AdamW: no JIT-compiled fused op (40 s on a CPU node), and ZeRO 0-3 all accept it
        "optimizer": {"type": "AdamW", "params": {"lr": lr, "betas": [0.9, 0.999], "eps": 1e-8, "weight_decay": cfg.weight_decay, "torch_adam": True}},
        "scheduler": {"type": "WarmupLR", "params": {"warmup_min_lr": 0.0, "warmup_max_lr": lr, "warmup_num_steps": max(1, cfg.warmup_steps), "warmup_type": "linear"}},
        "steps_per_print": 10**9,
        "wall_clock_breakdown": False,
    }


# ------------------------------------------------------------------------------------------------ the worker
class _Local:
    """Where this worker writes: local output folders directly, S3 outputs through a local staging folder."""

    def __init__(self, output: str):
        self.output = output
        self.staging = None if storage.is_s3(output) else output
        if self.staging is None:
            self.staging = tempfile.mkdtemp(prefix="dmd-ray-output-")

    def path(self, *parts: str) -> str:
        p = os.path.join(self.staging, *parts)
        os.makedirs(os.path.dirname(p), exist_ok=True)
        return p

    def publish(self, *parts: str) -> str:
        """Copies a staged file to the output (a no-op for local outputs); returns its URI there."""
        uri = storage.join(self.output, *parts)
        if storage.is_s3(self.output):
            with open(os.path.join(self.staging, *parts), "rb") as f:
                storage.write_bytes(uri, f.read())
        return uri


def _save_rng(path: str, rng: torch.Generator) -> None:
    from safetensors.torch import save_file

    save_file({"rng": rng.get_state()}, path)


def _load_rng(path: str, rng: torch.Generator) -> None:
    from safetensors.torch import load_file

    rng.set_state(load_file(path)["rng"])


def train_loop_per_worker(config: dict) -> None:
    """Runs on every Ray Train worker (DeepSpeed and Ray Train are imported here, not on the driver)."""
    import deepspeed
    import ray.train
    import ray.train.torch
    from ray.data import DataContext

    from dmd_ray.models import UNetDenoiser, load_teacher

    cfg = DistillConfig(**{**config["cfg"], "sample_prompts": tuple(config["cfg"]["sample_prompts"])})
    prompts: list[str] = config["prompts"]
    facts: dict = config["facts"]
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    device = ray.train.torch.get_device()
    DataContext.get_current().execution_options.preserve_order = True  # deterministic pair order per worker
    DataContext.get_current().enable_progress_bars = False
    dtype = torch.bfloat16 if cfg.precision == "bf16" else torch.float32
    if device.type == "cpu":
        torch.set_num_threads(max(1, int(cfg.cpus_per_worker)))

    # ---- models: the frozen teacher, and two trainable copies of its UNet
    teacher = load_teacher(cfg.teacher, cache_dir=cfg.cache_dir or None)
    generator_unet = copy.deepcopy(teacher.unet).train().requires_grad_(True)
    fake_unet = copy.deepcopy(teacher.unet).train().requires_grad_(True)
    if cfg.gradient_checkpointing:
        generator_unet.enable_gradient_checkpointing()
        fake_unet.enable_gradient_checkpointing()
    teacher.to(device=device, dtype=dtype)
    fake_lr = cfg.fake_lr or cfg.lr
    gen_engine, *_ = deepspeed.initialize(model=UNetDenoiser(generator_unet), config=deepspeed_config(cfg, cfg.lr, cfg.local_dm_batch + cfg.local_reg_batch))
    fake_engine, *_ = deepspeed.initialize(model=UNetDenoiser(fake_unet), config=deepspeed_config(cfg, fake_lr, cfg.local_dm_batch))
    generator, objective = build_objective(cfg, teacher, gen_engine, fake_engine, device)

    # ---- state: resume from the latest checkpoint when there is one
    rng = torch.Generator("cpu").manual_seed(cfg.seed * 1000 + rank)
    step, stream_state = 0, None
    checkpoint = ray.train.get_checkpoint()
    if checkpoint is not None:
        with checkpoint.as_directory() as d:
            gen_engine.load_checkpoint(os.path.join(d, "generator"))
            fake_engine.load_checkpoint(os.path.join(d, "fake"))
            with open(os.path.join(d, "trainer_state.json")) as f:
                state = json.load(f)
            step = state["step"]
            if state["world_size"] == world and os.path.exists(os.path.join(d, f"rng_rank{rank}.safetensors")):
                _load_rng(os.path.join(d, f"rng_rank{rank}.safetensors"), rng)
                stream_state = state["pair_streams"][rank]
            else:  # resumed on another number of workers: exact replay is impossible, start a fresh epoch order
                rng.manual_seed(cfg.seed * 1000 + rank + 7919 * step)
        if rank == 0:
            print(f"[distill] resumed from step {step}", flush=True)
    stream = pairs.PairStream(facts["pairs"], cfg.local_reg_batch, rank, world, cfg.seed, stream_state)
    latent_shape = tuple(facts["latent_shape"])
    out = _Local(cfg.output)
    writer = _tensorboard(out) if rank == 0 else None
    history = _load_history(cfg.output) if rank == 0 else []

    def sample_grid(tag: str) -> str | None:
        """Every rank runs the generator (ZeRO-3 gathers weights collectively); rank 0 writes the PNG."""
        from dmd_ray.images import grid, png_bytes, to_uint8

        noise = torch.stack([pairs.pair_noise(pairs.pair_seed(cfg.seed + 12345, i), latent_shape) for i in range(len(cfg.sample_prompts))])
        with torch.no_grad():
            images = teacher.decode(generator(noise.to(device), teacher.encode_prompts(list(cfg.sample_prompts))))
        if rank != 0:
            return None
        data = png_bytes(grid(to_uint8(images), columns=len(cfg.sample_prompts)), min_size=256)
        storage.write_bytes(storage.join(cfg.output, "samples", f"{tag}.png"), data)
        storage.write_bytes(storage.join(cfg.output, "samples", "latest.png"), data)
        return storage.join(cfg.output, "samples", f"{tag}.png")

    def save_checkpoint(metrics: dict) -> None:
        with tempfile.TemporaryDirectory(prefix="dmd-ray-ckpt-") as d:
            gen_engine.save_checkpoint(os.path.join(d, "generator"), tag=f"step{step}")
            fake_engine.save_checkpoint(os.path.join(d, "fake"), tag=f"step{step}")
            _save_rng(os.path.join(d, f"rng_rank{rank}.safetensors"), rng)
            # every rank's stream position, gathered so that rank 0 can write one trainer_state.json
            states = [None] * world
            torch.distributed.all_gather_object(states, stream.state())
            if rank == 0:
                with open(os.path.join(d, "trainer_state.json"), "w") as f:
                    json.dump({"step": step, "world_size": world, "pair_streams": states, "config": dataclasses.asdict(cfg)}, f)
                _save_history(cfg.output, history)
                if writer is not None:
                    writer.flush()
                    _publish_tree(out, "tensorboard")
            ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(d), checkpoint_dir_name=f"checkpoint_step{step:07d}")

    kill_marker = storage.join(cfg.output, ".debug_kill_done")
    if step == 0 and cfg.sample_every:
        sample_grid("step_0000000")
    deadline = time.monotonic() + 60 * cfg.time_limit_minutes
    last = step >= cfg.max_steps  # a finished run that is rerun only exports again
    while not last:
        if step == cfg.debug_kill_at_step and rank == cfg.debug_kill_rank and not storage.exists(kill_marker):
            storage.write_bytes(kill_marker, b"killed once")
            print(f"[distill] debug: killing rank {rank} at step {step}", flush=True)
            os.kill(os.getpid(), 9)
        started = time.perf_counter()
        logs = dmd_iteration(cfg, objective, teacher, prompts, next(stream), rng, latent_shape, device, _engine_update(gen_engine), _engine_update(fake_engine), fake_engine)
        if device.type == "cuda":
            torch.cuda.synchronize()
        step += 1
        seconds = time.perf_counter() - started
        last = step >= cfg.max_steps or bool(cfg.time_limit_minutes and step % 10 == 0 and past_deadline(deadline, device))
        if last and step < cfg.max_steps and rank == 0:
            print(f"[distill] time limit of {cfg.time_limit_minutes} minutes reached at step {step} of {cfg.max_steps}: stopping here", flush=True)
        metrics = {
            "step": step,
            **logs,
            "lr_generator": gen_engine.get_lr()[0],
            "lr_fake": fake_engine.get_lr()[0],
            "step_time_s": seconds,
            "samples_per_s": (cfg.dm_batch_size + cfg.reg_batch_size) / seconds,
        }
        if device.type == "cuda":
            metrics["peak_memory_gib"] = torch.cuda.max_memory_allocated() / 2**30
        if rank == 0:
            history.append(metrics)
            if writer is not None:
                for k, v in metrics.items():
                    if k != "step":
                        writer.add_scalar(k, v, step)
            if step % cfg.log_every == 0 or last:
                print("[distill] " + "  ".join(f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}" for k, v in metrics.items()), flush=True)
        if cfg.sample_every and (step % cfg.sample_every == 0 or last):
            sample_grid(f"step_{step:07d}")
        if cfg.checkpoint_every and (step % cfg.checkpoint_every == 0 or last):
            save_checkpoint(metrics)
        elif step % cfg.log_every == 0:
            ray.train.report(metrics)

    stream.close()
    if rank == 0:
        _save_history(cfg.output, history)
    if not cfg.export:
        return
    # ---- export (weights gathered on every rank under ZeRO-3; rank 0 writes)
    state = _gathered_state_dict(gen_engine, cfg.zero_stage)
    if rank == 0:
        from dmd_ray.export import export_generator

        export_unet = copy.deepcopy(teacher.unet).to("cpu", torch.float32)
        export_unet.load_state_dict({k.removeprefix("unet."): v.float().cpu() for k, v in state.items()})
        with tempfile.TemporaryDirectory(prefix="dmd-ray-export-") as d:
            local = os.path.join(d, "export") if storage.is_s3(cfg.output) else os.path.join(storage.resolve(cfg.output)[1], "export")
            export_generator(teacher.to("cpu", torch.float32), export_unet, local, generator.timestep, {"teacher": cfg.teacher, "steps": step, "guidance_scale": cfg.guidance_scale}, dtype=getattr(torch, cfg.export_dtype))
            if storage.is_s3(cfg.output):
                _upload_tree(local, storage.join(cfg.output, "export"))
        if writer is not None:
            writer.close()
            _publish_tree(out, "tensorboard")
        print(f"[distill] export written to {storage.join(cfg.output, 'export')}", flush=True)
    if world > 1:
        torch.distributed.barrier()


def build_objective(cfg: DistillConfig, teacher, generator_net, fake_net, device):
    """The generator and the DMD objective around two trainable denoisers (UNetDenoiser modules, or DeepSpeed
    engines wrapping them)."""
    from dmd_ray.denoiser import GuidedDenoiser, X0Denoiser
    from dmd_ray.distill import DMDObjective
    from dmd_ray.generator import OneStepGenerator
    from dmd_ray.losses import DenoisingLoss, DistributionMatchingLoss, LPIPSDistance, RegressionLoss, squared_l2

    schedule, prediction_type = teacher.schedule, teacher.prediction_type
    timestep = schedule.num_timesteps - 1 if cfg.generator_timestep < 0 else cfg.generator_timestep
    generator = OneStepGenerator(generator_net, schedule, prediction_type, timestep)
    real_x0 = X0Denoiser(GuidedDenoiser(teacher.denoiser(), cfg.guidance_scale, teacher.uncond_embedding()), schedule, prediction_type)
    if cfg.regression_space == "pixel":
        lpips = LPIPSDistance(cfg.lpips_backbone, cfg.lpips_pretrained_backbone, cfg.lpips_min_size).to(device)
        regression = RegressionLoss(lpips, decode=teacher.decode)
    else:
        regression = RegressionLoss(squared_l2)
    objective = DMDObjective(
        generator=generator,
        dm_loss=DistributionMatchingLoss(real_x0, X0Denoiser(fake_net, schedule, prediction_type), schedule, (cfg.t_min, cfg.t_max)),
        fake_loss=DenoisingLoss(schedule, prediction_type),
        regression=regression,
        lambda_reg=cfg.lambda_reg,
        dm_weight=cfg.dm_weight,
    )
    return generator, objective


def dmd_iteration(cfg: DistillConfig, objective, teacher, prompts: list[str], batch: dict, rng: torch.Generator, latent_shape, device, update_generator, update_fake, fake_net) -> dict:
    """One DMD iteration (Alg. 1) on this worker's share of the batch: a generator update on fresh noise and
    prompts (DM) plus stored pairs (regression), then `fake_updates` fake-score updates on detached samples.
    `update_*(loss)` backpropagates and steps: a DeepSpeed engine here, a torch optimiser in benchmarks."""

    def fresh(n):
        chosen = [prompts[i] for i in torch.randint(0, len(prompts), (n,), generator=rng).tolist()]
        return torch.randn((n, *latent_shape), generator=rng).to(device), teacher.encode_prompts(chosen)

    noise, cond = fresh(cfg.local_dm_batch)
    pair_cond = teacher.encode_prompts(batch["prompt"]) if cfg.lambda_reg else None
    loss, logs = objective.generator_loss(
        noise, cond, batch["noise"].to(device, torch.float32), pair_cond, batch["target"].to(device, torch.float32), generator=rng
    )
    logs["grad_norm_generator"] = update_generator(loss)
    for _ in range(cfg.fake_updates if objective.needs_fake_score else 0):
        fake_noise, fake_cond = fresh(cfg.local_dm_batch)
        loss_f, logs_f = objective.fake_score_loss(fake_net, fake_noise, fake_cond, generator=rng)
        logs["grad_norm_fake"] = update_fake(loss_f)
        logs.update(logs_f)
    return logs


def _engine_update(engine):
    def update(loss) -> float:
        engine.backward(loss)
        engine.step()
        return _grad_norm(engine)

    return update


def _grad_norm(engine) -> float:
    norm = engine.get_global_grad_norm()
    return float(norm) if norm is not None else float("nan")


def _gathered_state_dict(engine, zero_stage: int) -> dict:
    """The engine's module weights, whole, on every rank (ZeRO-3 shards them: gather collectively)."""
    import deepspeed

    module = engine.module
    if zero_stage == 3:
        with deepspeed.zero.GatheredParameters(list(module.parameters()), modifier_rank=None):
            return {k: v.detach().clone().cpu() for k, v in module.state_dict().items()}
    return {k: v.detach().cpu() for k, v in module.state_dict().items()}


def _tensorboard(out: _Local):
    from torch.utils.tensorboard import SummaryWriter

    return SummaryWriter(out.path("tensorboard", ".keep").rsplit("/", 1)[0])


def _publish_tree(out: _Local, sub: str) -> None:
    if not storage.is_s3(out.output):
        return
    root = os.path.join(out.staging, sub)
    for dirpath, _, files in os.walk(root):
        for name in files:
            rel = os.path.relpath(os.path.join(dirpath, name), out.staging)
            out.publish(*rel.split(os.sep))


def _upload_tree(local: str, uri: str) -> None:
    for dirpath, _, files in os.walk(local):
        for name in files:
            rel = os.path.relpath(os.path.join(dirpath, name), local)
            with open(os.path.join(dirpath, name), "rb") as f:
                storage.write_bytes(storage.join(uri, *rel.split(os.sep)), f.read())


def _history_uri(output: str) -> str:
    return storage.join(output, "metrics.jsonl")


def _load_history(output: str) -> list[dict]:
    uri = _history_uri(output)
    if not storage.exists(uri):
        return []
    return [json.loads(line) for line in storage.read_bytes(uri).decode().splitlines() if line.strip()]


def _save_history(output: str, history: list[dict]) -> None:
    """One row per step; after a resume the replayed steps replace the rows of the attempt that died."""
    by_step = {int(row["step"]): row for row in history}
    storage.write_bytes(_history_uri(output), "".join(json.dumps(by_step[s]) + "\n" for s in sorted(by_step)).encode())


def read_history(output: str) -> list[dict]:
    rows = _load_history(output)
    by_step = {int(r["step"]): r for r in rows}
    return [by_step[s] for s in sorted(by_step)]


def builtin_prompts() -> list[str]:
    """The shapes domain's prompts (the default when no prompt file is given)."""
    rng = random.Random(0)
    sizes, colours = ("small", "large"), ("red", "green", "blue", "yellow", "white", "black")
    shapes = ("circle", "square", "triangle")
    prompts = [f"a {s} {c} {sh} on a {b} background" for s in sizes for c in colours for sh in shapes for b in colours if b != c]
    rng.shuffle(prompts)
    return prompts
