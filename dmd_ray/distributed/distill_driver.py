"""The distillation job on the driver: every check that can fail before any work, the teacher's pairs, then Ray
Train workers (distill_worker.py), each holding two DeepSpeed engines."""
from __future__ import annotations

import dataclasses
import json
import os
import time
from dataclasses import dataclass

from dmd_ray.config import DistillConfig, PairsConfig
from dmd_ray.data import pairs, storage
from dmd_ray.data.prompts import BUILTIN_PROMPTS, read_prompts
from dmd_ray.distributed.cluster import fit, init_ray, run_config, wants_gpu
from dmd_ray.sd.resolve import describe_teacher
from dmd_ray.typed_config import ConfigError


def log(msg: str) -> None:
    print(f"[distill {time.strftime('%H:%M:%S')}] {msg}", flush=True)


@dataclass(frozen=True)
class DistillPlan:
    """What the driver established for the workers: the prompt set and the shapes and places the config implies."""

    prompts: tuple[str, ...]
    prompts_uri: str
    pairs: str
    latent_shape: tuple[int, int, int]
    resolution: int
    pair_teacher: str  # what makes the pairs: the teacher, or the local folder of a student named by pair_teacher


def pairs_config(cfg: DistillConfig, plan: DistillPlan) -> PairsConfig:
    """The pair generation a distillation run implies when it is given no --pairs."""
    return PairsConfig(
        teacher=plan.pair_teacher, prompts=plan.prompts_uri, num_pairs=cfg.num_pairs, out=plan.pairs, sampler=cfg.pair_sampler, steps=cfg.pair_steps,
        guidance_scale=cfg.pairs_guidance, resolution=cfg.resolution, seed=cfg.seed, shard_size=cfg.pair_shard_size, cache_dir=cfg.cache_dir,
        batch_size=cfg.pair_batch_size, gpus_per_actor=cfg.pair_gpus_per_actor, compile=cfg.pair_compile,
    )


def prepare(cfg: DistillConfig, real_images=None) -> DistillPlan:
    """Every check that can fail before pairs are made or workers start: values, prompts (against the renderer of
    `real_images` too), teacher, weights, output, resumability and the given pairs. Nothing is written but the write
    probe of the output."""
    cfg.check()
    prompts = read_prompts(cfg.prompts or BUILTIN_PROMPTS)
    info = describe_teacher(cfg.teacher, cfg.cache_dir or None)
    resolution = cfg.resolution or info.default_resolution
    latent_shape = info.latent_shape(resolution)
    if cfg.generator_timestep >= 1000:
        raise ConfigError(f"generator_timestep {cfg.generator_timestep} is outside the teacher's [0, 999]")
    if cfg.regression_space == "pixel" and cfg.lambda_reg and cfg.lpips_pretrained_backbone:
        from dmd_ray.sd.weights import check_lpips_backbone

        check_lpips_backbone(cfg.lpips_backbone)
    if cfg.init_generator:
        check_initial_generator(cfg)
    pair_teacher = check_pair_teacher(cfg) if cfg.pair_teacher else cfg.teacher
    if cfg.init_fake_score:
        check_initial_fake_score(cfg)
    if cfg.gan_weight and cfg.gan_real == "renders" and real_images is not None:
        try:
            real_images.check(prompts)
        except ValueError as e:
            raise ConfigError(f"gan_real renders draws the domain's real images for the run's prompts: {e}") from e
    storage.check_access(cfg.output, write=True)
    check_resume_world_size(cfg)
    if cfg.pairs:
        check_given_pairs(cfg, latent_shape, prompts, pair_teacher)
    return DistillPlan(tuple(prompts), cfg.prompts or storage.join(cfg.output, "prompts.txt"), cfg.pairs or storage.join(cfg.output, "pairs"),
                       tuple(latent_shape), resolution, pair_teacher)


def check_given_pairs(cfg: DistillConfig, latent_shape, prompts: list[str], pair_teacher: str) -> None:
    """Pairs made by another teacher (or `pair_teacher`), guidance, sampler, step count or prompt set than the run's
    would train the generator towards another distribution: refuse them, naming each difference."""
    storage.check_access(cfg.pairs, write=False)
    manifest = pairs.load_manifest(cfg.pairs)
    if manifest is None:
        raise ConfigError(f"pairs {cfg.pairs!r} hold no pairs dataset (no {pairs.MANIFEST}); leave pairs empty to generate them")
    expected = {
        "teacher": pair_teacher, "guidance_scale": cfg.pairs_guidance, "sampler": cfg.pair_sampler, "steps": cfg.pair_steps,
        "latent_shape": list(latent_shape), "prompts_sha256": pairs.prompts_fingerprint(prompts),
    }
    if same_teacher(manifest["config"].get("teacher", ""), pair_teacher):
        expected["teacher"] = manifest["config"].get("teacher")
    different = pairs.differences(manifest["config"], expected)
    if different:
        raise ConfigError(
            f"pairs {cfg.pairs!r} were made with another teacher or config than this run's ({different}). Pass the settings "
            "they were made with (--teacher or --pair-teacher, --guidance-scale or --pair-guidance-scale, --pair-sampler, "
            "--pair-steps, --prompts), or leave --pairs empty to generate pairs for this config"
        )
    pairs.shard_uris(cfg.pairs)  # raises if incomplete
    if manifest["num_shards"] < cfg.num_workers:
        raise ConfigError(f"pairs {cfg.pairs!r} have {manifest['num_shards']} shards for {cfg.num_workers} workers: each worker needs at least one")


ARCHITECTURE_KEYS = ("in_channels", "out_channels", "block_out_channels", "down_block_types", "up_block_types", "layers_per_block",
                     "cross_attention_dim", "attention_head_dim", "transformer_layers_per_block")


def check_initial_generator(cfg: DistillConfig) -> None:
    """`init_generator` must be an exported student of the teacher's architecture (its weights replace the teacher's
    in the generator)."""
    from dmd_ray.sd.resolve import read_generator_info, resolve_generator

    folder = resolve_generator(cfg.init_generator, cfg.cache_dir or None)
    info = read_generator_info(folder)
    steps = len(info.get("generator_timesteps", [0]))
    own = int(info.get("generator_timestep", 999))
    if steps == cfg.generator_steps == 1 and cfg.generator_timestep >= 0 and cfg.generator_timestep != own:
        log(f"note: init_generator {cfg.init_generator!r} was trained reading its pure noise at t = {own}; this run moves it to "
            f"t = {cfg.generator_timestep} (--generator-timestep -1 continues at its own)")
    if steps != cfg.generator_steps:  # allowed, but measured to start badly: say so before any work
        log(f"note: init_generator {cfg.init_generator!r} was trained as a {steps}-step generator and this run trains a "
            f"{cfg.generator_steps}-step one. A one-step student no longer denoises at the lower timesteps of a chain (the "
            "shipped demo's own 4-step chain: FID 91; BENCHMARKS.md, 'Where a multi-step generator starts'): without "
            "--init-generator the run starts from the teacher")
    check_teachers_architecture(cfg, folder, "init_generator", cfg.init_generator)


def check_pair_teacher(cfg: DistillConfig) -> str:
    """`pair_teacher` must be an exported student of the teacher's architecture; returns what the pair job loads: its
    s3:// URI (each pair actor fetches it), or its local folder (a built-in name's folder in the package). A multi-step
    one with fresh-noise sampling is refused: its samples hold noise the student never sees."""
    from dmd_ray.sd.export import exported_sampler
    from dmd_ray.sd.resolve import read_generator_info, resolve_generator

    folder = resolve_generator(cfg.pair_teacher, cfg.cache_dir or None)
    check_teachers_architecture(cfg, folder, "pair_teacher", cfg.pair_teacher)
    if len(read_generator_info(folder).get("generator_timesteps", [0])) > 1 and exported_sampler(folder) != "ddim":
        raise ConfigError(f"pair_teacher {cfg.pair_teacher!r} samples with fresh noise between its steps (LCMScheduler): its outputs are "
                          "not a function of the pairs' noise. Export it with --multi-step-sampler ddim")
    return cfg.pair_teacher if storage.is_s3(cfg.pair_teacher) else folder


def check_teachers_architecture(cfg: DistillConfig, folder: str, key: str, spec: str) -> None:
    from dmd_ray.sd.resolve import unet_config

    # compared as JSON: a built-in teacher's config holds tuples where a saved folder's holds lists
    ours, theirs = (json.loads(json.dumps(c)) for c in (unet_config(cfg.teacher, cfg.cache_dir or None), unet_config(folder)))
    different = {k: (theirs.get(k), ours[k]) for k in ARCHITECTURE_KEYS if k in ours and theirs.get(k) != ours[k]}
    if different:
        raise ConfigError(f"{key} {spec!r} has another UNet than the teacher {cfg.teacher!r} "
                          f"({', '.join(f'{k}: {a} there, {b} here' for k, (a, b) in different.items())})")


def check_initial_fake_score(cfg: DistillConfig) -> None:
    """`init_fake_score` must hold a UNet of the teacher's architecture, every weight of the right shape."""
    import diffusers
    import torch

    from dmd_ray.sd.fake_score import check_fake_score
    from dmd_ray.sd.resolve import unet_config

    with torch.device("meta"):
        unet = diffusers.UNet2DConditionModel.from_config(unet_config(cfg.teacher, cfg.cache_dir or None))
    check_fake_score(cfg.init_fake_score, {k: list(v.shape) for k, v in unet.state_dict().items()})


def same_teacher(a: str, b: str) -> bool:
    """The same spec, or two local folders holding the same teacher (a job submitted with `ray job submit` sees the
    project under another path than the run that made its pairs): equal configs and equal weight sizes."""
    if a == b:
        return True
    folders = [storage.local_path(x) for x in (a, b)]
    if storage.is_s3(a) or storage.is_s3(b) or not all(os.path.isdir(f) for f in folders):
        return False

    def fingerprint(folder: str) -> list:
        files = sorted(os.path.relpath(os.path.join(d, n), folder) for d, _, names in os.walk(folder) for n in names)
        return [(f, os.path.getsize(os.path.join(folder, f)), open(os.path.join(folder, f), "rb").read() if f.endswith(".json") else None)
                for f in files]

    return fingerprint(folders[0]) == fingerprint(folders[1])


def check_resume_world_size(cfg: DistillConfig) -> None:
    """A rerun resumes from the run's latest checkpoint. Under ZeRO 1-3 each worker's checkpoint holds its partition
    of the optimizer state, and DeepSpeed (0.19) refuses to load them into another number of workers: say so before
    any worker starts."""
    run_dir = storage.join(cfg.output, cfg.run_name)
    checkpoints = [name for name in storage.list_files(run_dir, folders=True) if name.startswith("checkpoint_step")]
    if not checkpoints:
        return
    state = json.loads(storage.read_bytes(storage.join(run_dir, checkpoints[-1], "trainer_state.json")))
    saved_stage = state.get("config", {}).get("zero_stage", cfg.zero_stage)
    if saved_stage != cfg.zero_stage:  # ZeRO-0 keeps fp32 weights and torch's optimizer state, ZeRO 1-3 DeepSpeed's partitions
        raise ConfigError(f"{run_dir} resumes from {checkpoints[-1]}, written under ZeRO-{saved_stage}; its engine states do not load under "
                          f"ZeRO-{cfg.zero_stage}. Resume with --zero-stage {saved_stage}, or start a new run (--run-name or --output)")
    saved_flat = state.get("config", {}).get("flat_optimizer", False)
    if saved_stage == 0 and saved_flat != cfg.flat_optimizer:  # one flat optimizer state against one per parameter
        raise ConfigError(f"{run_dir} resumes from {checkpoints[-1]}, written with flat_optimizer {saved_flat}; its optimizer state does not load "
                          f"with flat_optimizer {cfg.flat_optimizer}. Resume with --flat-optimizer {str(saved_flat).lower()}, or start a new run")
    if state["world_size"] != cfg.num_workers and saved_stage >= 1:
        raise ConfigError(
            f"{run_dir} resumes from {checkpoints[-1]}, written by {state['world_size']} worker(s) under ZeRO-{saved_stage}; DeepSpeed cannot "
            f"re-partition ZeRO optimizer states over {cfg.num_workers} worker(s). Resume with --num-workers {state['world_size']}, "
            "or start a new run (--run-name or --output)"
        )


def distill(cfg: DistillConfig, probe=None, real_images=None):
    """Runs the whole job (pairs if needed, distillation, export); returns the Ray Train Result.

    `probe`, needed when cfg.eval_every > 0: a picklable callable `probe(make_images) -> {metric: value}` that judges
    the generator's images of its own prompts and seeds (`make_images(prompts, seeds)` -> uint8 NHWC array); it runs
    on rank 0 of the workers (shapes_eval.TrainingProbe for the shapes domain).
    `real_images`, needed for gan_real "renders": a picklable object whose call `(prompts, seed, resolution, device)`
    gives real images in [-1, 1] of the prompts and whose `check(prompts)` raises ValueError for one it cannot draw
    (shapes.Renderer for the shapes domain)."""
    deadline = time.time() + 60 * cfg.time_limit_minutes  # wall clock: the workers compare it with their own
    if cfg.eval_every and probe is None:
        raise ConfigError("eval_every needs a judge of the teacher's domain; the package has one for the shapes domain (the demo teacher, "
                          "with shapes prompts): set --eval-every 0 for other teachers")
    if cfg.gan_weight and cfg.gan_real == "renders" and real_images is None:
        raise ConfigError("gan_real renders needs the domain's real images; the package draws them for the shapes domain (the demo teacher, "
                          "with shapes prompts): set --gan-real pairs for other teachers")
    import ray.train
    from ray.train.torch import TorchTrainer

    from dmd_ray.distributed.distill_worker import train_loop_per_worker
    from dmd_ray.distributed.pair_job import generate_pairs

    # Ray Train workers and Ray Data actors run in other directories: every local path becomes absolute here
    cfg = dataclasses.replace(cfg, output=storage.absolute(cfg.output), pairs=storage.absolute(cfg.pairs), prompts=storage.absolute(cfg.prompts),
                              teacher=storage.absolute(cfg.teacher, only_if_exists=True), cache_dir=storage.absolute(cfg.cache_dir),
                              init_generator=storage.absolute(cfg.init_generator, only_if_exists=True), init_fake_score=storage.absolute(cfg.init_fake_score),
                              pair_teacher=storage.absolute(cfg.pair_teacher, only_if_exists=True))
    plan = prepare(cfg, real_images)
    init_ray()  # after the checks: a refused run starts no cluster
    if not cfg.prompts:  # the built-in prompts, where the pair actors can read them (an s3:// output on a cluster)
        storage.write_bytes(plan.prompts_uri, ("\n".join(plan.prompts) + "\n").encode())
    if not cfg.pairs:
        log(f"generating {cfg.num_pairs} pairs of {cfg.pair_teacher or 'the teacher'} into {plan.pairs}")
        generate_pairs(pairs_config(cfg, plan))
    use_gpu = wants_gpu(cfg.use_gpu)
    log(f"distilling {cfg.teacher} on {cfg.num_workers} worker(s) ({'GPU' if use_gpu else 'CPU'}), ZeRO-{cfg.zero_stage}, {cfg.precision}, {cfg.max_steps} steps")
    trainer = TorchTrainer(
        train_loop_per_worker,
        train_loop_config={"cfg": cfg, "plan": plan, "probe": probe, "real_images": real_images, "deadline": deadline},
        scaling_config=ray.train.ScalingConfig(num_workers=cfg.num_workers, use_gpu=use_gpu,
                                               resources_per_worker={"CPU": cfg.cpus_per_worker, **({"GPU": cfg.gpus_per_worker} if use_gpu else {})}),
        run_config=run_config(cfg.output, cfg.run_name, cfg.keep_checkpoints, cfg.max_failures, None if use_gpu else {"DS_ACCELERATOR": "cpu"}),
    )
    result = fit(trainer)
    log(f"done: export at {storage.join(cfg.output, 'export')}")
    log(f"sample grid at {storage.join(cfg.output, 'samples', 'latest.png')}; metrics at {storage.join(cfg.output, 'metrics.jsonl')}")
    return result
