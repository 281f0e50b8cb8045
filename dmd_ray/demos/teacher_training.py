"""Training a small Stable Diffusion-style teacher on the shapes domain: the pieces in pure PyTorch, and the Ray Train
worker loop that jobs/train_teacher.py launches (Ray is imported inside it only).

Two stages, as SD was made: first the VAE (reconstruction plus a small KL term, then its latents' scale measured
and stored as `scaling_factor`), then the UNet and text encoder together on the teacher's own denoising loss
(`DenoisingLoss`, the very loss the fake score trains on) with classifier-free-guidance dropout: a prompt is
replaced by "" with probability `cfg_dropout`, which is what the empty-prompt embedding of CFG then means.
"""
from __future__ import annotations

import dataclasses
import json
import os
import random
import tempfile
import time

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from dmd_ray.config import TeacherConfig
from dmd_ray.data import storage
from dmd_ray.demos import shapes
from dmd_ray.distributed.cluster import past_deadline, wants_gpu
from dmd_ray.typed_config import ConfigError


class TextConditionedUNet(nn.Module):
    """UNet and text encoder as one module: a denoiser over token ids, so that one DDP wrapper trains both."""

    def __init__(self, unet: nn.Module, text_encoder: nn.Module):
        super().__init__()
        self.unet, self.text_encoder = unet, text_encoder

    def forward(self, x_t: Tensor, t: Tensor, input_ids: Tensor) -> Tensor:
        cond = self.text_encoder(input_ids).last_hidden_state
        return self.unet(x_t, t, encoder_hidden_states=cond, return_dict=False)[0]


class PromptTokens:
    """Token ids per prompt, cached: the domain has a few hundred distinct prompts, and tokenising a thousand strings
    every step costs more than the small UNet's step itself."""

    def __init__(self, tokenizer):
        self.tokenizer, self.cache = tokenizer, {}

    def __call__(self, prompts: list[str], device) -> Tensor:
        missing = sorted({p for p in prompts if p not in self.cache})
        if missing:
            ids = self.tokenizer(missing, padding="max_length", max_length=self.tokenizer.model_max_length, truncation=True, return_tensors="pt").input_ids
            self.cache.update(zip(missing, ids))
        return torch.stack([self.cache[p] for p in prompts]).to(device, non_blocking=True)


def training_batch(rng: random.Random, batch_size: int, device, partial: float, cfg_dropout: float) -> tuple[Tensor, list[str]]:
    """Freshly rendered images and their prompts; with CFG dropout some prompts are ""."""
    scenes = shapes.random_scenes(batch_size, rng, partial=partial)
    images = shapes.render(scenes, seed=rng.getrandbits(62), device=device)
    prompts = ["" if rng.random() < cfg_dropout else s.prompt for s in scenes]
    return images, prompts


def vae_loss(vae: nn.Module, images: Tensor, kl_weight: float) -> tuple[Tensor, dict[str, float]]:
    posterior = vae.encode(images).latent_dist
    recon = vae.decode(posterior.sample()).sample
    l1, mse = F.l1_loss(recon, images), F.mse_loss(recon, images)
    kl = posterior.kl().mean()
    return l1 + mse + kl_weight * kl, {"loss_l1": l1.item(), "loss_mse": mse.item(), "kl": kl.item()}


@torch.no_grad()
def latent_scale(vae: nn.Module, device, num_images: int = 2048, seed: int = 1234) -> float:
    """1 / std of the VAE's latents over the domain: SD's `scaling_factor`, which makes latents unit-variance."""
    rng = random.Random(seed)
    latents = []
    for _ in range(num_images // 256):
        images = shapes.render(shapes.random_scenes(256, rng), seed=rng.getrandbits(62), device=device)
        latents.append(vae.encode(images).latent_dist.mean.float())
    return float(1.0 / torch.cat(latents).std())


# --------------------------------------------------------------------------------------------- the Ray Train worker
# what a resumed run must share with the run that wrote the checkpoint (the rest, e.g. log_every, may change)
RESUME_KEYS = ("prediction_type", "seed", "init_from", "vae_steps", "vae_lr", "kl_weight", "unet_steps", "lr", "warmup_steps", "cfg_dropout",
               "partial_prompts", "ema_decay", "batch_size", "num_workers")


def log(msg: str) -> None:
    print(f"[train_teacher {time.strftime('%H:%M:%S')}] {msg}", flush=True)


def _save_checkpoint(rank: int, state: dict, models: dict, optimizer, emas: dict, metrics: dict) -> None:
    """Weights in safetensors; the optimizer state through torch.save (read back with weights_only=True). Every
    rank reports (Ray Train expects it); rank 0 alone writes, since the replicas are identical."""
    import ray.train
    import torch
    from safetensors.torch import save_file

    if rank != 0:
        ray.train.report(metrics)
        return
    with tempfile.TemporaryDirectory() as d:
        tensors = {f"{name}.{k}": v.detach().float().cpu().contiguous() for name, m in models.items() for k, v in m.state_dict().items()}
        tensors.update({f"ema_{name}.{k}": v.cpu().contiguous() for name, ema in emas.items() for k, v in ema.shadow.items()})
        save_file(tensors, os.path.join(d, "weights.safetensors"))
        if optimizer is not None:  # None between stages: the next stage starts its own optimizer
            torch.save(optimizer.state_dict(), os.path.join(d, "optimizer.pt"))
        with open(os.path.join(d, "state.json"), "w") as f:
            json.dump(state, f)
        ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(d))


def _load_checkpoint(checkpoint, models: dict, emas: dict, device) -> tuple[dict, dict]:
    import torch
    from safetensors.torch import load_file

    with checkpoint.as_directory() as d:
        tensors = load_file(os.path.join(d, "weights.safetensors"))
        for name, m in models.items():
            m.load_state_dict({k[len(name) + 1 :]: v for k, v in tensors.items() if k.startswith(name + ".")})
        for name, ema in emas.items():
            ema.load({k[len(name) + 5 :]: v for k, v in tensors.items() if k.startswith(f"ema_{name}.")})
        optimizer_path = os.path.join(d, "optimizer.pt")
        optimizer_state = torch.load(optimizer_path, map_location=device, weights_only=True) if os.path.exists(optimizer_path) else None
        with open(os.path.join(d, "state.json")) as f:
            return json.load(f), optimizer_state


def train_loop_per_worker(config: dict) -> None:
    import random

    import ray.train
    import ray.train.torch
    import torch
    from torch import nn

    from dmd_ray.method.losses import DenoisingLoss
    from dmd_ray.method.optim import WeightAverage, warmup_schedule
    from dmd_ray.sd.architectures import build_demo_architecture
    from dmd_ray.sd.resolve import load_teacher

    cfg: TeacherConfig = config["cfg"]
    recipe = dataclasses.asdict(cfg)  # saved in checkpoints: a resumed run must share RESUME_KEYS with it
    deadline = time.monotonic() + 60 * cfg.time_limit_minutes
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    device = ray.train.torch.get_device()
    if device.type == "cpu":
        torch.set_num_threads(max(1, int(cfg.cpus_per_worker)))
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=cfg.precision == "bf16" and device.type == "cuda")
    local_batch = cfg.batch_size // world
    if cfg.init_from:  # go on training a teacher: its VAE (and latent scale) stay, stage 1 is skipped
        teacher = load_teacher(cfg.init_from)  # its prediction type was checked by train_teacher
        state = {"stage": "unet", "step": 0, "scaling_factor": float(teacher.vae.config.scaling_factor), "config": recipe}
    else:
        teacher = build_demo_architecture(cfg.seed, cfg.prediction_type)
        state = {"stage": "vae", "step": 0, "scaling_factor": None, "config": recipe}
    vae, denoiser = teacher.vae, TextConditionedUNet(teacher.unet, teacher.text_encoder)
    for m in (vae, denoiser):
        m.to(device).train().requires_grad_(True)
    emas = {"denoiser": WeightAverage(denoiser, cfg.ema_decay)}

    def optimizer_for(stage: str):
        params, lr, warmup = (vae.parameters(), cfg.vae_lr, 100) if stage == "vae" else (denoiser.parameters(), cfg.lr, cfg.warmup_steps)
        steps = cfg.vae_steps if stage == "vae" else cfg.unet_steps
        opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.01, betas=(0.9, 0.99))
        return opt, warmup_schedule(opt, warmup, steps, "warmup_times_cosine")

    models = {"vae": vae, "denoiser": denoiser}
    checkpoint = ray.train.get_checkpoint()
    optimizer_state = None
    if checkpoint is not None:
        state, optimizer_state = _load_checkpoint(checkpoint, models, emas, device)
        changed = {k: (v, recipe[k]) for k, v in state.get("config", {}).items() if k in RESUME_KEYS and recipe[k] != v}
        if changed:
            raise ConfigError(f"{cfg.output}/{cfg.run_name} holds a run with another recipe ({', '.join(f'{k}: {a} -> {b}' for k, (a, b) in changed.items())}); "
                             "use another --output or --run-name, or the same settings to resume")
        if rank == 0:
            log(f"resumed: stage {state['stage']}, step {state['step']}")
    if state["scaling_factor"] is not None:
        vae.register_to_config(scaling_factor=state["scaling_factor"])
    # a fresh data stream per (rank, stage, resumed step): the images are random draws, never a fixed epoch order
    rng = random.Random(cfg.seed * 1000 + rank + 7919 * state["step"] + (10**6 if state["stage"] != "vae" else 0))

    def run_stage(stage: str, steps: int, step_fn, trained: nn.Module):
        nonlocal optimizer_state
        opt, sched = optimizer_for(stage)
        if optimizer_state is not None:
            opt.load_state_dict(optimizer_state)
            optimizer_state = None
        for _ in range(state["step"]):
            sched.step()
        model = ray.train.torch.prepare_model(trained, move_to_device=False) if world > 1 else trained
        t0, seen = time.perf_counter(), 0
        while state["step"] < steps:
            if stage == "unet" and cfg.time_limit_minutes and state["step"] % 20 == 0 and past_deadline(deadline, device):
                if rank == 0:
                    log(f"time limit of {cfg.time_limit_minutes} minutes reached at step {state['step']} of {steps}: stopping the UNet stage here")
                break
            with autocast:
                loss, logs = step_fn(model)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            grad_norm = torch.nn.utils.clip_grad_norm_(trained.parameters(), cfg.grad_clip)
            opt.step()
            sched.step()
            if stage == "unet":
                emas["denoiser"].update()
            state["step"] += 1
            seen += cfg.batch_size
            step = state["step"]
            metrics = None
            if step % cfg.log_every == 0 or step == steps:
                metrics = {"stage": stage, "step": step, "loss": loss.item(), "grad_norm": float(grad_norm), "lr": sched.get_last_lr()[0],
                           "images_per_s": seen / (time.perf_counter() - t0), **logs}
                if rank == 0:
                    log(" ".join(f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}" for k, v in metrics.items()))
                t0, seen = time.perf_counter(), 0
            if cfg.checkpoint_every and step % cfg.checkpoint_every == 0 and step < steps:
                _save_checkpoint(rank, state, models, opt, emas, metrics or {"stage": stage, "step": step})
            elif metrics is not None:
                ray.train.report(metrics)
        return opt

    if state["stage"] == "vae":
        run_stage("vae", cfg.vae_steps, lambda m: vae_loss(m, training_batch(rng, local_batch, device, 0.0, 0.0)[0], cfg.kl_weight), vae)
        scale = latent_scale(vae, device)
        vae.register_to_config(scaling_factor=scale)
        state.update(stage="unet", step=0, scaling_factor=scale)
        _save_checkpoint(rank, state, models, None, emas, {"stage": "vae", "step": cfg.vae_steps, "scaling_factor": scale})
        if rank == 0:
            log(f"VAE done; latent scaling_factor {scale:.4f}")
    vae.eval().requires_grad_(False)
    if state["stage"] == "unet":
        denoising = DenoisingLoss(teacher.schedule, cfg.prediction_type)
        tokens = PromptTokens(teacher.tokenizer)
        compiled = torch.compile(denoiser) if cfg.compile else denoiser

        def unet_step(model):
            images, prompts = training_batch(rng, local_batch, device, cfg.partial_prompts, cfg.cfg_dropout)
            with torch.no_grad():
                latents = vae.encode(images).latent_dist.sample() * vae.config.scaling_factor
            return denoising(compiled if model is denoiser else model, latents.float(), tokens(prompts, device)), {}

        opt = run_stage("unet", cfg.unet_steps, unet_step, denoiser)
        state.update(stage="done")
        _save_checkpoint(rank, state, models, opt, emas, {"stage": "unet", "step": cfg.unet_steps})

    if rank == 0:
        denoiser.load_state_dict({**denoiser.state_dict(), **emas["denoiser"].shadow})  # the average is what ships
        dtype = torch.float16 if cfg.save_dtype == "float16" else torch.float32
        teacher.to(device="cpu", dtype=dtype)
        teacher.source = "demo"
        teacher.publish(storage.join(cfg.output, "teacher"))
        log(f"teacher written to {storage.join(cfg.output, 'teacher')}")


def train_teacher(cfg: TeacherConfig):
    """Trains a demo teacher on Ray Train workers (jobs/train_teacher.py); returns the Ray Train Result."""
    import ray.train
    from ray.train.torch import TorchTrainer

    from dmd_ray.distributed.cluster import fit, init_ray, run_config
    from dmd_ray.sd.resolve import describe_teacher

    cfg.check()
    # the workers run in another directory: local paths become absolute
    cfg = dataclasses.replace(cfg, output=storage.absolute(cfg.output), init_from=storage.absolute(cfg.init_from, only_if_exists=True))
    if cfg.init_from:  # a missing or mismatched teacher is named here, not in a worker's traceback
        info = describe_teacher(cfg.init_from)
        if info.prediction_type != cfg.prediction_type:
            raise ConfigError(f"init_from {cfg.init_from!r} predicts {info.prediction_type}, the config says {cfg.prediction_type}")
    storage.check_access(cfg.output)
    init_ray()  # after the checks: a refused run starts no cluster
    use_gpu = wants_gpu(cfg.use_gpu)
    vae = f"VAE from {cfg.init_from}" if cfg.init_from else f"VAE {cfg.vae_steps} steps"
    log(f"training on {cfg.num_workers} worker(s) ({'GPU' if use_gpu else 'CPU'}): {vae}, UNet {cfg.unet_steps} steps, batch {cfg.batch_size}")
    trainer = TorchTrainer(
        train_loop_per_worker,
        train_loop_config={"cfg": cfg},
        scaling_config=ray.train.ScalingConfig(num_workers=cfg.num_workers, use_gpu=use_gpu, resources_per_worker={"CPU": cfg.cpus_per_worker, **({"GPU": 1} if use_gpu else {})}),
        run_config=run_config(cfg.output, cfg.run_name, keep_checkpoints=1, max_failures=2),
    )
    result = fit(trainer)
    log(f"done: teacher at {storage.join(cfg.output, 'teacher')}")
    return result
