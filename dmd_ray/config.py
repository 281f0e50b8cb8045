"""Every job's typed config: the keys of its YAML presets and --key-name options, and the checks of their values.

The machinery (YAML, command line, coercion, ConfigError) is typed_config.py. Each `check()` needs no I/O and
raises one ConfigError listing every problem; the jobs check storage, teachers, pairs and weights before any work.
"""
from __future__ import annotations

import sys
from dataclasses import dataclass
from typing import Any, Callable, TypeVar

from dmd_ray.data.pairs import ShardLayout
from dmd_ray.data.storage import StorageError
from dmd_ray.method.generator import SAMPLERS as MULTI_STEP_SAMPLERS
from dmd_ray.sd.resolve import ModelNotFoundError
from dmd_ray.sd.teacher import DTYPES, FEATURE_LEVELS
from dmd_ray.sd.teacher_sampler import SAMPLERS
from dmd_ray.typed_config import ConfigError, parse_args, raise_problems

T = TypeVar("T")

DEFAULT_SAMPLE_PROMPTS = (
    "a small red circle on a blue background",
    "a large green square on a white background",
    "a yellow triangle on a black background",
    "a small blue square on a yellow background",
)
USE_GPU = ("auto", "true", "false")  # auto: GPUs when the cluster has them when the job starts
COMPILE_SETTINGS = ("auto", "true", "false", "default", "reduce-overhead", "max-autotune-no-cudagraphs")


def cli_main(prog: str, cls: type[T], run: Callable[[T], Any], argv: list[str] | None = None, description: str | None = None,
             defaults: dict | None = None, setup: Callable[[], None] | None = None) -> int:
    """Every job's main(): parse and check the config, `setup()` (e.g. join Ray), `run(cfg)`. A problem the user can
    fix (a bad value, a missing file, unreachable storage or weights) ends with its message and exit code 2."""
    cfg = parse_args(cls, argv, description, defaults)
    try:
        cfg.check()
        if setup is not None:
            setup()
        run(cfg)
    except (ConfigError, ModelNotFoundError, FileNotFoundError, PermissionError, StorageError) as e:
        print(f"{prog}: error: {e}", file=sys.stderr)
        return 2
    return 0


# ------------------------------------------------------------------------------------------------ pairs
@dataclass
class PairsConfig:
    """Config of `jobs/generate_pairs.py` (every key can be set in YAML or as --key-name on the command line)."""

    teacher: str = "tiny"  # built-in name, local diffusers folder, s3:// URI or hub id
    prompts: str = ""  # .txt (one per line), .csv/.jsonl/.parquet (a "prompt" column); local or s3://
    num_pairs: int = 1024
    out: str = "runs/pairs"  # local folder or s3://bucket/prefix
    sampler: str = "pndm"  # DMD used 50 PNDM steps with guidance 3 for SD 1.5
    steps: int = 50
    guidance_scale: float = 3.0
    resolution: int = 0  # pixels; 0: the teacher's default
    dtype: str = "auto"  # float16 on GPU, float32 on CPU; or float32 / float16 / bfloat16
    seed: int = 0
    shard_size: int = 256
    batch_size: int = 16  # pairs per sampler call inside an actor
    num_actors: int = 0  # 0: one per GPU (or 1 on a machine without GPUs)
    gpus_per_actor: float = -1.0  # -1: 1 when the cluster has GPUs, else 0
    cpus_per_actor: float = 1.0
    # torch.compile of the teacher's UNet: false, auto (GPU: reduce-overhead, one CUDA graph per step shape at the
    # fixed batch, short batches padded to it; CPU: eager), true (default mode), false or a mode. auto: 1.36x the eager
    # diffusers pipeline's pairs/s on an H200 at SD 1.5 size, after ~60 s of compilation per actor (BENCHMARKS.md)
    compile: str = "auto"
    cache_dir: str = ""  # where s3:// teachers are cached; default ~/.cache/dmd_ray/teachers

    def compile_mode(self, device_type: str) -> str | None:
        if self.compile == "false" or (self.compile == "auto" and device_type != "cuda"):
            return None
        return {"auto": "reduce-overhead", "true": "default"}.get(self.compile, self.compile)

    def check(self) -> None:
        problems = []
        if self.compile not in COMPILE_SETTINGS:
            problems.append(f"compile must be one of {', '.join(COMPILE_SETTINGS)}, got {self.compile!r}")
        if not self.prompts:
            problems.append("prompts is required (a .txt/.csv/.jsonl/.parquet file, local or s3://)")
        if self.num_pairs <= 0:
            problems.append(f"num_pairs must be positive, got {self.num_pairs}")
        if self.shard_size <= 0:
            problems.append(f"shard_size must be positive, got {self.shard_size}")
        if self.batch_size <= 0:
            problems.append(f"batch_size must be positive, got {self.batch_size}")
        if self.steps <= 0:
            problems.append(f"steps must be positive, got {self.steps}")
        if self.sampler not in SAMPLERS:
            problems.append(f"sampler must be one of {sorted(SAMPLERS)}, got {self.sampler!r}")
        if self.dtype not in ("auto", *DTYPES):
            problems.append(f"dtype must be auto, float32, float16 or bfloat16, got {self.dtype!r}")
        if self.resolution < 0:
            problems.append(f"resolution must be positive (or 0 for the teacher's default), got {self.resolution}")
        if self.guidance_scale < 1.0:
            problems.append(f"guidance_scale must be >= 1 (1 disables guidance), got {self.guidance_scale}")
        raise_problems("PairsConfig", problems)

    @property
    def layout(self) -> ShardLayout:
        return ShardLayout(self.num_pairs, self.shard_size)


# ------------------------------------------------------------------------------------------------ distillation
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
    # the implied pair generation's torch.compile (PairsConfig.compile): off, since a distillation's own pairs are
    # usually few thousand of a small teacher, made faster than the ~60 s its compilation costs; auto for large sets
    pair_compile: str = "false"
    # the model whose sampler makes the pairs: "" the teacher (DMD's ODE pairs), or a few-step student of it (an exported
    # generator: built-in name, folder or s3://) whose deterministic chain gives the targets, a multi-step export with
    # multi_step_sampler ddim run by --pair-sampler ddim --pair-steps N --pair-guidance-scale 1 (its own N steps, 25x fewer
    # network calls per pair than PNDM 50 with guidance; BENCHMARKS.md, "Four steps without fresh noise")
    pair_teacher: str = ""
    pair_guidance_scale: float = -1.0  # the pair sampler's guidance; -1: guidance_scale, the real score's (DMD's pairs)
    # the method
    guidance_scale: float = 3.0  # real score's classifier-free guidance (DMD: 3 for FID, 8 for visual quality)
    lambda_reg: float = 0.25  # 0: the "without regression" ablation
    dm_weight: float = 1.0  # 0: the "without distribution matching" ablation (regression only; no fake score updates)
    t_min: float = 0.02  # DM-loss timesteps, as fractions of T
    t_max: float = 0.98
    # the timestep a one-step generator reads its pure noise at. -1: init_generator's own, else T - 1 (999 for SD, DMD's).
    # DMD2's one-step SDXL reads it at 399, where an epsilon network's error reaches x0 1.5x instead of 14.6x at 999
    generator_timestep: int = -1
    # an exported student (built-in name, folder or s3://) whose network starts the generator instead of the teacher's:
    # DMD2's recipe for one-step SDXL, regression pre-training then DMD. The fake score starts from the teacher's
    # network, or from init_fake_score
    init_generator: str = ""
    # the fake_score.safetensors an earlier run wrote beside its export (local or s3://): the fake score (and GAN head)
    # start from it instead of the teacher; with init_generator set to that run's export, DMD continues where it
    # stopped (optimiser moments and the step count start afresh)
    init_fake_score: str = ""
    # DMD2 (Yin et al. 2024b): `fake_updates` is its two time-scale rule; these add its GAN and multi-step generator
    generator_steps: int = 1  # > 1: DMD2's multi-step generator at t_k = (n - k) * (T // n) - 1 (999, 749, 499, 249 for
    #                           4), trained with backward simulation; needs lambda_reg 0
    # how a multi-step generator samples (its export's scheduler, the in-training probe): "ddim" re-noises with the
    # noise the network read (deterministic; DDIMScheduler), "lcm" with fresh noise (DMD2's; LCMScheduler). Training's
    # backward simulation re-noises with fresh noise either way. ddim measured better for demo-4step (BENCHMARKS.md)
    multi_step_sampler: str = "ddim"
    gan_weight: float = 0.0  # > 0: DMD2's GAN term in the generator's loss (DMD2: 3e-3 ImageNet, 1e-3 SD 1.5)
    gan_discriminator_weight: float = 1e-2  # the classifier's loss weight in the fake-score update (DMD2: 1e-2)
    # the classifier's real samples: "pairs" (the pairs' teacher outputs: every teacher has them, but the GAN can then
    # only pull the student toward the teacher) or "renders" (the shapes domain's real images, encoded by the teacher's
    # VAE into a bank of gan_real_size latents at the start: DMD2's real data, with which a student can beat its teacher)
    gan_real: str = "pairs"
    gan_real_size: int = 8192
    # which of the fake score's features the classifier reads: "bottleneck" (DMD2's: the mid block, and the up blocks
    # skipped) or "decoder" (the last up block's output, at the latent resolution: the demo teacher's bottleneck is 2x2,
    # where a triangle's corners are hard to see; the classifier then runs the whole UNet)
    gan_features: str = "bottleneck"
    fake_updates: int = 1  # fake-score updates per generator update (DMD2's TTUR: 5-10)
    regression_space: str = "pixel"  # "pixel": decode both sides with the VAE, LPIPS; "latent": L2 on latents
    lpips_backbone: str = "vgg"  # DMD used VGG
    lpips_pretrained_backbone: bool = True  # False: random backbone, the package's calibrated heads (offline)
    lpips_min_size: int = 224  # images are upsampled to this before LPIPS (DMD: 224)
    resolution: int = 0  # pixels; 0: the teacher's default
    # optimisation (DMD: AdamW, wd 0.01, betas (0.9, 0.999), 500 warm-up steps, clip 10, lr 1e-5 for SD 1.5)
    max_steps: int = 1000
    # > 0: the job stops training (checkpoint, samples, export follow) this many minutes after it started, even before
    # max_steps: pair generation, Ray Train's start and compilation count, and a restarted worker keeps the job's deadline
    time_limit_minutes: float = 0.0
    dm_batch_size: int = 8  # global, split over workers
    reg_batch_size: int = 4  # global, split over workers
    lr: float = 1e-5
    fake_lr: float = 0.0  # 0: same as lr
    weight_decay: float = 0.01
    warmup_steps: int = 500
    grad_clip: float = 10.0
    # > 0: an exponential moving average of the generator's weights (decay per step, e.g. 0.999: about the last 1,000
    # steps), updated after every step; the export, the quality probe and the sample grids use it, and checkpoints keep
    # it. The one-step generator's DM gradient is noisy (BENCHMARKS.md: the in-training probe's accuracy moves by
    # 0.02-0.07 between evaluations); the average smooths what ships. ZeRO 0-2 (ZeRO-3 shards the weights it would average)
    ema_decay: float = 0.0
    # the average warmed up (WeightAverage.update's count): for its first 1/(1 - ema_decay) steps the plain mean of the
    # weights so far, so that the starting weights weigh no more than any step's (without: 13% of the export after
    # 2,000 steps at 0.999). The step number counts from the run's first step, across resumes.
    ema_warmup: bool = True
    precision: str = "bf16"  # bf16 (fp16 diverges, DMD2) or fp32
    zero_stage: int = 2
    gradient_checkpointing: bool = False
    # speed (BENCHMARKS.md, "DMD iteration"): torch.compile of the step's networks (the three UNets, and the VAE
    # decoder and LPIPS of the pixel regression loss): auto (on GPU: CUDA graphs under ZeRO-0, the default mode under
    # ZeRO 1-2, eager under ZeRO-3), true (default mode), false, or a torch.compile mode (reduce-overhead,
    # max-autotune-no-cudagraphs, ...). Compiled once per run: the shapes are fixed, sample grids run eager.
    compile: str = "auto"
    # torch.compile's caches (Inductor's kernels and AOTAutograd's graphs, not Dynamo's tracing) saved after the first
    # compiled steps and loaded by a resumed run, so that it skips most of the compilation: "auto" (<output>/compile_cache.bin),
    # "" (none), or a file (local or s3://) that runs of the same shapes share. Loading it unpickles: keep it where
    # only the runs' owners write, as the checkpoints.
    compile_cache: str = "auto"
    fused_adamw: str = "auto"  # true / auto (on GPU): torch's fused AdamW kernel instead of its per-tensor loop
    # ZeRO-0: each engine's weights in one flat buffer, the gradients gathered into one flat gradient after backward,
    # so that clipping and AdamW run as one kernel each instead of loops over every parameter (host time; one extra
    # gradient copy in memory; 7% less per iteration on the demo teacher on an H200, BENCHMARKS.md, eighth round). A
    # checkpoint resumes only under the setting that wrote it
    flat_optimizer: bool = True
    # the step's convolutional networks (the three UNets, the VAE decoder and LPIPS of the pixel regression loss)
    # with their weights in channels-last memory format, so that their activations follow: bf16 convolutions on a
    # GPU run in NHWC, and in NCHW cuDNN converts every input and output (Inductor leaves UNet training graphs NCHW:
    # their decoder's convolutions narrow the channels). auto: on GPU. The trained networks follow under ZeRO-0 with
    # flat_optimizer (ZeRO 1-3 keep DeepSpeed's contiguous flat views). Checkpoints and exports are the same either way.
    # Off by default: on the demo teacher (H100) it cut GPU work 13% at the same wall time (BENCHMARKS.md); GPU-bound
    # steps, where that would show, are not measured yet
    channels_last: str = "false"
    # after the first compiled steps, check only the guards that tell torch.compile's cached graphs apart (not under
    # ZeRO-3): ~1 ms less host time per compiled network call. A step that needs a graph the first steps did not
    # compile then fails loudly ("Recompilation triggered with skip_guard_eval_unsafe stance") instead of compiling;
    # the step's shapes and modes are fixed per run, so none does (each network has its own compiled code object:
    # distill_worker.compile_network says why that matters)
    skip_guards: bool = True
    # scale
    num_workers: int = 1
    use_gpu: str = "auto"  # auto | true | false
    cpus_per_worker: float = 1.0
    gpus_per_worker: float = 1.0  # < 1 lets several small runs share one GPU (e.g. ablations side by side)
    # checkpoints, logs, samples
    checkpoint_every: int = 100  # steps; 0: no checkpoints (nothing to resume from)
    keep_checkpoints: int = 2
    max_failures: int = 2
    # the losses are read from the device (a host sync), written to metrics.jsonl/TensorBoard and printed every
    # `log_every` steps; between them the host queues work without waiting for the device
    log_every: int = 10
    # steps between ray.train.report calls besides checkpoints and the last step (0: only those). A report waits
    # until Ray Train's controller has taken the previous one, and the controller polls every 2 s (Ray 2.60):
    # reporting every step held the job to ~2 s per step (BENCHMARKS.md). metrics.jsonl and TensorBoard get every
    # log step regardless
    report_every: int = 0
    sample_every: int = 100  # steps; 0: no sample grids
    # where an iteration's time goes: torch.profiler over this many steps on rank 0, from the first step after the
    # compiled warm-up (the 4th), written to <output>/profile.json and the log (GPU time and kernel launches per
    # iteration, the ops that take the most device and host time; the profiled steps run slower); 0: off
    profile_steps: int = 0
    # quality during training: every `eval_every` steps (0: never) the generator makes `eval_samples` images that a
    # judge of the teacher's domain scores (FID in its features, prompt accuracy) into metrics.jsonl and TensorBoard.
    # The package has a judge for the shapes domain (the demo teacher): jobs/distill.py passes it for shapes prompts
    eval_every: int = 0
    eval_samples: int = 360
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

    @property
    def pairs_guidance(self) -> float:
        return self.guidance_scale if self.pair_guidance_scale == -1 else self.pair_guidance_scale

    def recipe(self) -> dict:
        """What decides a student's quality, recorded with its export (dmd_ray.json): the losses and their weights,
        the update ratio, the rates and the global batches."""
        keys = ("init_generator", "init_fake_score", "dm_weight", "lambda_reg", "regression_space", "gan_weight", "gan_real", "gan_features", "fake_updates", "generator_steps", "lr", "fake_lr",
                "dm_batch_size", "reg_batch_size", "t_min", "t_max", "ema_decay")
        recipe = {k: getattr(self, k) for k in keys}
        if self.pair_teacher and self.lambda_reg:
            recipe.update(pair_teacher=self.pair_teacher, pair_sampler=self.pair_sampler, pair_steps=self.pair_steps, pair_guidance_scale=self.pairs_guidance)
        if self.regression_space == "pixel" and self.lambda_reg:
            recipe.update(lpips_backbone=self.lpips_backbone, lpips_pretrained_backbone=self.lpips_pretrained_backbone)
        return recipe

    def check(self) -> None:
        """The checks that need no I/O: values, ranges and batch arithmetic."""
        problems = []
        if self.time_limit_minutes < 0:
            problems.append(f"time_limit_minutes must be >= 0, got {self.time_limit_minutes}")
        if self.export_dtype not in DTYPES:
            problems.append(f"export_dtype must be float32, float16 or bfloat16, got {self.export_dtype!r}")
        if self.gpus_per_worker <= 0 or (self.gpus_per_worker > 1 and self.gpus_per_worker != int(self.gpus_per_worker)):
            problems.append(f"gpus_per_worker must be a fraction in (0, 1] or a whole number, got {self.gpus_per_worker}")
        if self.zero_stage not in (0, 1, 2, 3):
            problems.append(f"zero_stage must be 0, 1, 2 or 3, got {self.zero_stage}")
        if self.num_workers < 1:
            problems.append(f"num_workers must be >= 1, got {self.num_workers}")
        else:
            for name in ("dm_batch_size", "reg_batch_size"):
                value = getattr(self, name)
                if value < self.num_workers or value % self.num_workers:
                    problems.append(f"{name} {value} does not divide over {self.num_workers} workers (it is the global batch: use a multiple of num_workers)")
        if self.precision not in ("bf16", "fp32"):
            problems.append(f"precision must be bf16 or fp32, got {self.precision!r} (fp16 diverges, see DMD2)")
        if not 0.0 <= self.t_min <= self.t_max <= 1.0:
            problems.append(f"need 0 <= t_min <= t_max <= 1, got t_min {self.t_min}, t_max {self.t_max}")
        if min(self.dm_weight, self.lambda_reg, self.gan_weight, self.gan_discriminator_weight) < 0 or (self.dm_weight == 0 and self.lambda_reg == 0 and self.gan_weight == 0):
            problems.append(f"dm_weight, lambda_reg and gan_weight must be >= 0 and not all 0 (the generator would learn nothing), got {self.dm_weight}, {self.lambda_reg} and {self.gan_weight}")
        if self.generator_steps < 1:
            problems.append(f"generator_steps must be >= 1, got {self.generator_steps}")
        elif self.generator_steps > 1 and (self.lambda_reg != 0 or self.generator_timestep != -1):
            problems.append(f"a {self.generator_steps}-step generator trains without the one-step regression loss and at its own timesteps: "
                            f"set --lambda-reg 0 (got {self.lambda_reg}) and leave --generator-timestep at -1 (got {self.generator_timestep})")
        if self.multi_step_sampler not in MULTI_STEP_SAMPLERS:
            problems.append(f"multi_step_sampler must be one of {', '.join(MULTI_STEP_SAMPLERS)}, got {self.multi_step_sampler!r}")
        if not 0.0 <= self.ema_decay < 1.0:
            problems.append(f"ema_decay must be in [0, 1) (0: no weight average), got {self.ema_decay}")
        elif self.ema_decay and self.zero_stage == 3:
            problems.append("ema_decay needs the generator's whole weights on every worker: use zero_stage 0-2 (ZeRO-3 shards them)")
        if self.init_fake_score and self.dm_weight == 0 and self.gan_weight == 0:
            problems.append("init_fake_score is given to a run without a fake score (dm_weight 0 and gan_weight 0)")
        if self.gan_real not in ("pairs", "renders"):
            problems.append(f"gan_real must be pairs or renders, got {self.gan_real!r}")
        if self.gan_features not in FEATURE_LEVELS:
            problems.append(f"gan_features must be one of {', '.join(FEATURE_LEVELS)}, got {self.gan_features!r}")
        if self.gan_real_size < 1:
            problems.append(f"gan_real_size must be >= 1, got {self.gan_real_size}")
        if self.regression_space not in ("pixel", "latent"):
            problems.append(f"regression_space must be pixel or latent, got {self.regression_space!r}")
        if self.use_gpu not in USE_GPU:
            problems.append(f"use_gpu must be auto, true or false, got {self.use_gpu!r}")
        for name in ("max_steps", "fake_updates", "log_every", "num_pairs"):
            if getattr(self, name) < 1:
                problems.append(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.eval_samples < 2:
            problems.append(f"eval_samples must be >= 2 (FID needs two), got {self.eval_samples}")
        for name in ("checkpoint_every", "sample_every", "eval_every", "report_every", "profile_steps"):
            if getattr(self, name) < 0:
                problems.append(f"{name} must be >= 0 (0 turns it off), got {getattr(self, name)}")
        if self.lr <= 0 or self.fake_lr < 0:
            problems.append("lr must be positive and fake_lr non-negative")
        if self.guidance_scale < 1:
            problems.append(f"guidance_scale must be >= 1, got {self.guidance_scale}")
        if self.compile not in COMPILE_SETTINGS:
            problems.append(f"compile must be one of {', '.join(COMPILE_SETTINGS)}, got {self.compile!r}")
        if self.pair_compile not in COMPILE_SETTINGS:
            problems.append(f"pair_compile must be one of {', '.join(COMPILE_SETTINGS)}, got {self.pair_compile!r}")
        if self.pair_guidance_scale < 0 and self.pair_guidance_scale != -1:
            problems.append(f"pair_guidance_scale must be >= 0, or -1 for guidance_scale, got {self.pair_guidance_scale}")
        for name in ("fused_adamw", "channels_last"):
            if getattr(self, name) not in USE_GPU:
                problems.append(f"{name} must be auto, true or false, got {getattr(self, name)!r}")
        raise_problems("DistillConfig", problems)

    def fused_adamw_on(self, device_type: str) -> bool:
        return self.fused_adamw == "true" or (self.fused_adamw == "auto" and device_type == "cuda")

    def channels_last_on(self, device_type: str) -> bool:
        return self.channels_last == "true" or (self.channels_last == "auto" and device_type == "cuda")

    def compile_mode(self, device_type: str) -> str | None:
        """The torch.compile mode for the networks on this device, or None for eager. "auto" leaves ZeRO-3 eager:
        its parameter-gathering hooks run inside the forward."""
        if self.compile == "false" or (self.compile == "auto" and (device_type != "cuda" or self.zero_stage == 3)):
            return None
        if self.compile == "auto":
            return "reduce-overhead" if self.zero_stage == 0 else "default"
        return "default" if self.compile == "true" else self.compile


# ------------------------------------------------------------------------------------------------ evaluation
@dataclass
class EvalConfig:
    """Config of `jobs/evaluate.py` (every key can be set in YAML or as --key-name on the command line)."""

    model: str = "teacher:demo"  # comma-separated model specs (see the module docstring)
    output: str = "runs/eval"  # local folder or s3://: metrics.json and grid.png
    num_samples: int = 1000
    seed: int = 0
    sampler: str = "pndm"  # for teacher: models
    steps: int = 50
    guidance_scale: float = 3.0  # for teacher: and teacher-onestep: models (generators run unguided)
    batch_size: int = 128
    num_actors: int = 1
    gpus_per_actor: float = -1.0  # -1: 1 when the cluster has GPUs, else 0
    grid_columns: int = 8
    # one of the models: every other one also gets 95% intervals of its FID and accuracy *differences* from it, over
    # the same resamplings of the shared prompts and seeds (paired: much narrower than comparing two intervals, so
    # that an ordering can be stated); "" for none
    paired_against: str = ""

    def models(self) -> list[str]:
        return [m.strip() for m in self.model.split(",") if m.strip()]

    def check(self) -> None:
        problems = []
        if not self.models():
            problems.append("model is empty")
        if self.paired_against and self.paired_against not in self.models():
            problems.append(f"paired_against {self.paired_against!r} is not one of the models ({', '.join(self.models())})")
        if self.num_samples < 2:
            problems.append(f"num_samples must be >= 2, got {self.num_samples}")
        if self.batch_size < 1 or self.num_actors < 1:
            problems.append("batch_size and num_actors must be >= 1")
        raise_problems("EvalConfig", problems)


# ------------------------------------------------------------------------------------------------ demo teacher
@dataclass
class TeacherConfig:
    """Config of `jobs/train_teacher.py` (every key can be set in YAML or as --key-name on the command line)."""

    output: str = "runs/teacher"  # local folder or s3://bucket/prefix; the teacher lands in <output>/teacher
    run_name: str = "train"
    prediction_type: str = "epsilon"  # as SD 1.5
    seed: int = 0
    init_from: str = ""  # a teacher (name, folder, s3://) to keep training: its VAE is kept (stage 1 skipped), its UNet and text encoder go on
    # stage 1: the VAE
    vae_steps: int = 3000
    vae_lr: float = 1e-3
    kl_weight: float = 1e-6
    # stage 2: UNet and text encoder
    unet_steps: int = 12000
    lr: float = 5e-4
    warmup_steps: int = 500
    cfg_dropout: float = 0.1  # prompts replaced by "" (classifier-free guidance's null condition)
    partial_prompts: float = 0.25  # prompts that leave size and background unsaid
    ema_decay: float = 0.999
    # both stages
    batch_size: int = 256  # global, split over workers
    grad_clip: float = 1.0
    precision: str = "bf16"  # autocast on GPU; CPU runs in fp32
    num_workers: int = 1
    use_gpu: str = "auto"  # auto | true | false
    cpus_per_worker: float = 1.0
    log_every: int = 200
    checkpoint_every: int = 2000  # steps of either stage; 0: only at the end of each stage
    compile: bool = False  # torch.compile the UNet and text encoder (the small model is launch-bound on a GPU)
    save_dtype: str = "float16"  # the shipped folder's weights (float16 halves its size); float32 for exact copies
    time_limit_minutes: float = 0.0  # > 0: the UNet stage stops at this wall time (the lr schedule is cut short) and the EMA is saved

    def check(self) -> None:
        problems = []
        if self.batch_size % self.num_workers:
            problems.append(f"batch_size {self.batch_size} does not divide over {self.num_workers} workers")
        if self.prediction_type not in ("epsilon", "v_prediction", "sample"):
            problems.append(f"prediction_type must be epsilon, v_prediction or sample, got {self.prediction_type!r}")
        if self.vae_steps < 1 or self.unet_steps < 1:
            problems.append("vae_steps and unet_steps must be >= 1")
        if not 0 <= self.cfg_dropout < 1 or not 0 <= self.partial_prompts <= 1:
            problems.append("cfg_dropout must be in [0, 1) and partial_prompts in [0, 1]")
        if self.precision not in ("bf16", "fp32") or self.save_dtype not in ("float16", "float32"):
            problems.append("precision must be bf16 or fp32, save_dtype float16 or float32")
        if self.use_gpu not in USE_GPU:
            problems.append(f"use_gpu must be auto, true or false, got {self.use_gpu!r}")
        if self.time_limit_minutes < 0:
            problems.append(f"time_limit_minutes must be >= 0, got {self.time_limit_minutes}")
        raise_problems("TeacherConfig", problems)


# ------------------------------------------------------------------------------------------------ 2D toy
@dataclass
class ToyConfig:
    """Config of `python -m dmd_ray.demos.toy2d` (every key can be set in YAML or as --key-name on the command line)."""

    out: str = "runs/toy2d"  # metrics.json and samples.png land here
    target: str = ""  # the mixture as JSON: {"means": [[x, y], ...], "std": s, "weights": [...]}; "": 8 modes on a ring
    seed: int = 0
    # teacher
    prediction_type: str = "v_prediction"
    teacher_steps: int = 4000
    teacher_batch: int = 1024
    teacher_lr: float = 1e-3
    sampler: str = "ddim"
    sampler_steps: int = 100
    # pairs and evaluation
    num_pairs: int = 8192
    eval_samples: int = 20000
    # distillation: DMD's AdamW (wd 0.01, betas 0.9/0.999), warm-up, grad clip 10 and 1:1 updates; lr, batch and
    # steps sized for a 2D MLP. The fake score keeps a constant lr so it tracks the generator closely (a slower one
    # lets the two oscillate); the generator's lr anneals to 0 so it settles instead of random-walking on the DM
    # gradient's noise.
    distill_steps: int = 3000
    batch: int = 1024
    generator_lr: float = 1e-3
    fake_lr: float = 1e-3
    warmup_steps: int = 100
    generator_lr_schedule: str = "cosine"
    fake_lr_schedule: str = "constant"
    grad_clip: float = 10.0
    # The DM gradient is normalised to O(1) per element whatever the distance to the target, while an L2 regression
    # gradient is 2 * lambda * |G(z) - y| and vanishes as G approaches y: lambda must make regression matter at the
    # scale of a mode's width (~0.07 in normalised units here). DMD's 0.25 was calibrated for LPIPS on images.
    lambda_reg: float = 25.0
    fake_updates: int = 1
    # DMD App. C.2: without regression the generator diverges at the full lr; the paper lowered it 5x (5e-5 -> 1e-5)
    no_regression_lr_scale: float = 0.2
    t_range: tuple[float, float] = (0.02, 0.98)
    generator_timestep: int = 999
    variants: tuple[str, ...] = ("dmd", "dmd_no_regression", "dmd_no_dm")

    def check(self) -> None:
        problems = []  # `target` is parsed where the mixture is built, before any work
        unknown = sorted(set(self.variants) - {"dmd", "dmd_no_regression", "dmd_no_dm"})
        if unknown:
            problems.append(f"unknown variants {unknown}; known: dmd, dmd_no_regression, dmd_no_dm")
        for name in ("teacher_steps", "distill_steps", "batch", "teacher_batch", "num_pairs", "eval_samples", "sampler_steps"):
            if getattr(self, name) < 1:
                problems.append(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.sampler not in SAMPLERS:
            problems.append(f"sampler must be one of {sorted(SAMPLERS)}, got {self.sampler!r}")
        raise_problems("ToyConfig", problems)
