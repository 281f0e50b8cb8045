"""Distillation: Ray Train with two DeepSpeed engines per worker (2 workers, gloo on CPU), checkpoints, resume,
export to a diffusers folder, and the configuration errors that must stop a job before any worker starts."""
import dataclasses
import functools
import json
import os

import pytest
import torch

from dmd_ray.config import DistillConfig, PairsConfig
from dmd_ray.data import pairs, storage
from dmd_ray.distributed.distill_driver import distill
from dmd_ray.distributed.pair_job import generate_pairs
from dmd_ray.distributed.run_records import read_history
from dmd_ray.typed_config import ConfigError

pytestmark = pytest.mark.slow


def small(output, pairs_uri="", **overrides) -> DistillConfig:
    """The tiny teacher, 2 workers, ZeRO-2, bf16, L2 regression in latent space: a few seconds per step on CPU."""
    values = dict(
        teacher="tiny", output=output, pairs=pairs_uri, num_pairs=32, pair_sampler="ddim", pair_steps=4, pair_shard_size=8,
        num_workers=2, zero_stage=2, max_steps=4, dm_batch_size=4, reg_batch_size=2, lr=1e-4, warmup_steps=2,
        regression_space="latent", checkpoint_every=2, sample_every=100, max_failures=1, log_every=1,
    )
    values.update(overrides)
    return DistillConfig(**values)


@pytest.fixture(scope="module")
def shared_pairs(ray_cluster, tmp_path_factory):
    """One pairs dataset for the runs below (the generation path itself is covered by test_pairs.py)."""
    out = str(tmp_path_factory.mktemp("pairs") / "pairs")
    prompts = tmp_path_factory.mktemp("prompts") / "p.txt"
    prompts.write_text("\n".join(["a small red circle on a blue background", "a large green square on a white background", "a blue triangle"]))
    generate_pairs(PairsConfig(teacher="tiny", prompts=str(prompts), num_pairs=32, shard_size=8, steps=4, sampler="ddim", guidance_scale=3.0, out=out))
    return out, str(prompts)


def losses(history):
    return [(row["step"], row["loss_dm"], row["loss_reg"], row["loss_fake"]) for row in history]


# ------------------------------------------------------------------------------------------------ end to end
def test_distil_export_and_load_with_diffusers(ray_cluster, tmp_path, monkeypatch):
    """Pairs generated first, 2 workers, LPIPS in pixel space through the VAE; then the export runs in one step.
    The output is a relative path, as in the demo: workers and actors run in other directories."""
    from diffusers import DiffusionPipeline

    monkeypatch.chdir(tmp_path)
    out = str(tmp_path / "run")
    from dmd_ray.demos.shapes_eval import TrainingProbe

    cfg = small("run", regression_space="pixel", lpips_backbone="alex", lpips_pretrained_backbone=False, lpips_min_size=32, sample_every=2,
                eval_every=2, eval_samples=24)
    distill(cfg, TrainingProbe(cfg.eval_samples, cfg.seed))
    history = read_history(out)
    assert [r["step"] for r in history] == [1, 2, 3, 4]
    assert [r["step"] for r in history if "eval_fid" in r and "eval_prompt_accuracy" in r] == [2, 4]  # quality during training
    for row in history:
        for key in ("loss_dm", "loss_reg", "loss_fake", "grad_norm_generator", "grad_norm_fake", "lr_generator", "lr_fake", "samples_per_s", "step_time_s"):
            assert key in row and row[key] == row[key]  # present and not NaN
    assert history[0]["lr_generator"] < history[-1]["lr_generator"]  # warm-up
    assert os.path.getsize(os.path.join(out, "samples", "latest.png")) > 1000
    assert os.path.exists(os.path.join(out, "samples", "step_0000004.png"))
    assert any(f.startswith("events.out.tfevents") for f in os.listdir(os.path.join(out, "tensorboard")))
    assert os.path.getsize(os.path.join(out, "metrics.png")) > 10_000  # losses and the in-training evaluation
    assert pairs.load_manifest(os.path.join(out, "pairs"))["status"] == "complete"

    export = os.path.join(out, "export")
    weights = [f for _, _, files in os.walk(export) for f in files if f.endswith((".bin", ".pt", ".ckpt", ".pth"))]
    assert weights == []
    info = json.load(open(os.path.join(export, "dmd_ray.json")))  # what the student was trained with travels with it
    assert info["steps"] == 4 and info["recipe"] == cfg.recipe() and info["recipe"]["lpips_backbone"] == "alex"
    pipe = DiffusionPipeline.from_pretrained(export)
    image = pipe("a small red circle on a blue background", num_inference_steps=1, guidance_scale=1.0, output_type="np").images
    assert image.shape == (1, 32, 32, 3) and float(image.std()) > 0

    # the exported pipeline's single step is the generator: x0 of the UNet at t = 999 from the same noise
    from dmd_ray.method.generator import OneStepGenerator
    from dmd_ray.sd.resolve import load_teacher

    teacher = load_teacher(export)
    g = OneStepGenerator(teacher.denoiser(), teacher.schedule, teacher.prediction_type, 999)
    z = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    cond = teacher.encode_prompts(["a blue triangle"])
    latents = pipe("a blue triangle", num_inference_steps=1, guidance_scale=1.0, latents=z.clone(), output_type="latent").images
    torch.testing.assert_close(latents, g(z, cond), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("zero_stage, num_workers, flat_optimizer", [(2, 2, False), (0, 1, False), (0, 1, True)])
def test_exact_resume(ray_cluster, shared_pairs, tmp_path, zero_stage, num_workers, flat_optimizer):
    """Stopping after step 2 and resuming gives steps 3-4 with exactly the losses of the uninterrupted run: under
    ZeRO-2 (DeepSpeed's bf16 optimizer) and under ZeRO-0 on one worker (fp32 weights under autocast, the client
    optimizer, clipping in engine_update, no all-reduce). With a weight average of the generator (ema_decay), which
    the export holds and the checkpoint keeps: both runs export the same weights, and not the trained ones."""
    pairs_uri, prompts = shared_pairs
    run = functools.partial(small, pairs_uri=pairs_uri, prompts=prompts, zero_stage=zero_stage, num_workers=num_workers, ema_decay=0.5,
                            flat_optimizer=flat_optimizer)
    straight = str(tmp_path / "straight")
    distill(run(straight, profile_steps=1))  # the profiler only watches: the same losses
    with open(os.path.join(straight, "profile.json")) as f:
        profile = json.load(f)
    assert profile["steps"] == [4, 4] and profile["top_cpu_ms"] and "launches_per_iteration" in profile
    resumed = str(tmp_path / "resumed")
    distill(run(resumed, max_steps=2))
    distill(run(resumed, max_steps=4))
    a, b = losses(read_history(straight)), losses(read_history(resumed))
    assert [s for s, *_ in b] == [1, 2, 3, 4]
    assert a == b
    from safetensors.torch import load_file

    exported = [load_file(os.path.join(out, "export", "unet", "diffusion_pytorch_model.safetensors")) for out in (straight, resumed)]
    assert exported[0].keys() == exported[1].keys()
    for k in exported[0]:
        torch.testing.assert_close(exported[0][k], exported[1][k], rtol=0, atol=0)
    if zero_stage == 0 and not flat_optimizer:  # one run without the average (a few seconds on one worker)
        no_average = str(tmp_path / "no_average")
        distill(run(no_average, ema_decay=0.0, checkpoint_every=0))
        assert losses(read_history(no_average)) == a  # the average does not touch training
        trained = load_file(os.path.join(no_average, "export", "unet", "diffusion_pytorch_model.safetensors"))
        assert any(not torch.equal(trained[k], exported[0][k]) for k in trained)  # the export is the average
    if zero_stage == 2:  # ZeRO-2 optimizer partitions cannot move to another number of workers: refused before any worker starts
        with pytest.raises(ConfigError, match="written by 2 worker.*ZeRO-2.*--num-workers 2"):
            distill(run(resumed, max_steps=6, num_workers=1))


def test_killed_worker_is_replaced_and_the_run_completes(ray_cluster, shared_pairs, tmp_path):
    pairs_uri, prompts = shared_pairs
    out = str(tmp_path / "run")
    # ZeRO-0 over 2 workers: the engines' gradient all-reduce, then clipping in engine_update
    distill(small(out, pairs_uri, prompts=prompts, zero_stage=0, debug_kill_at_step=3, debug_kill_rank=1, max_failures=2))
    assert storage.exists(os.path.join(out, ".debug_kill_done"))
    assert [r["step"] for r in read_history(out)] == [1, 2, 3, 4]
    assert os.path.isdir(os.path.join(out, "export", "unet"))


def test_zero3_checkpoints_on_s3(ray_cluster, shared_pairs, s3_bucket):
    """ZeRO-3 (sharded weights) with the run's storage on the local S3 server: checkpoints, metrics and the
    export land there, and a second run resumes from the checkpoint in S3."""
    pairs_uri, prompts = shared_pairs
    out = f"{s3_bucket}/runs/zero3"
    distill(small(out, pairs_uri, prompts=prompts, zero_stage=3, max_steps=2))
    keys = {k["Key"] for k in storage.boto3_client().list_objects_v2(Bucket=s3_bucket[5:], Prefix="runs/zero3/")["Contents"]}
    ckpt = [k for k in keys if "/train/checkpoint_step0000002/" in k]
    assert any("zero_pp_rank_1" in k and "/generator/" in k for k in ckpt), sorted(keys)[:20]
    assert any("zero_pp_rank_1" in k and "/fake/" in k for k in ckpt)
    assert "runs/zero3/export/unet/diffusion_pytorch_model.safetensors" in keys
    distill(small(out, pairs_uri, prompts=prompts, zero_stage=3, max_steps=3))
    assert [r["step"] for r in read_history(out)] == [1, 2, 3]


@pytest.mark.parametrize("zero_stage, num_workers, gan_real", [(0, 1, "renders"), (3, 2, "pairs")])
def test_dmd2_recipe_through_the_engines(ray_cluster, shared_pairs, tmp_path, zero_stage, num_workers, gan_real):
    """DMD2's switches together through the job: GAN term (its generator side runs the fake score outside its
    DeepSpeed engine, whose forward claims every backward through it) with real samples from the shapes renderer or
    the pairs, two time-scale updates, no regression, a 2-step generator with backward simulation; under ZeRO-0
    (autocast) and ZeRO-3 (sharded weights)."""
    pairs_uri, prompts = shared_pairs
    out = str(tmp_path / "run")
    from dmd_ray.demos.shapes import Renderer

    distill(small(out, pairs_uri, prompts=prompts, zero_stage=zero_stage, num_workers=num_workers, max_steps=2, checkpoint_every=0,
                  gan_weight=1e-2, fake_updates=2, lambda_reg=0.0, generator_steps=2, gan_real=gan_real, gan_real_size=64),
            real_images=Renderer() if gan_real == "renders" else None)
    history = read_history(out)
    assert [r["step"] for r in history] == [1, 2]
    assert all(r["loss_gan_generator"] == r["loss_gan_generator"] and r["loss_gan_discriminator"] > 0 for r in history)
    assert os.path.isdir(os.path.join(out, "export", "unet"))
    fake = read_fake_score(os.path.join(out, "fake_score.safetensors"))  # whole under ZeRO-3 too (gathered)
    assert any(k.startswith("unet.") for k in fake) and any(k.startswith("classifier.") for k in fake)


def test_a_time_limit_stops_training_and_the_export_follows(ray_cluster, shared_pairs, tmp_path):
    """time_limit_minutes counts from the job's start (set on the driver): a limit already past when training starts
    stops it at the first check (step 10, of 1000), and the export follows."""
    pairs_uri, prompts = shared_pairs
    out = str(tmp_path / "run")
    distill(small(out, pairs_uri, prompts=prompts, zero_stage=0, num_workers=1, max_steps=1000, checkpoint_every=0, log_every=5,
                  time_limit_minutes=0.001))
    assert [r["step"] for r in read_history(out)] == [5, 10]
    assert os.path.isdir(os.path.join(out, "export", "unet"))


def read_fake_score(path: str) -> dict:
    from safetensors.torch import load_file

    return load_file(path)


def test_a_run_continues_from_an_earlier_runs_generator_and_fake_score(ray_cluster, shared_pairs, tmp_path):
    """DMD continued in a second job (as runs longer than one GPU job are): the first run's export and
    fake_score.safetensors start the second's generator and fake score (GAN head included). At a learning rate of
    1e-12 the second run's weights stay the ones it started from, and those are not the teacher's."""
    from dmd_ray.sd.architectures import build_tiny_teacher

    pairs_uri, prompts = shared_pairs
    first, second = str(tmp_path / "first"), str(tmp_path / "second")
    run = functools.partial(small, pairs_uri=pairs_uri, prompts=prompts, zero_stage=0, num_workers=1, dm_batch_size=2, reg_batch_size=2,
                            max_steps=2, checkpoint_every=0, gan_weight=1e-2, export_dtype="float32")
    distill(run(first, lr=1e-2))
    started = read_fake_score(os.path.join(first, "fake_score.safetensors"))
    distill(run(second, lr=1e-12, fake_lr=1e-12, init_generator=os.path.join(first, "export"),
                init_fake_score=os.path.join(first, "fake_score.safetensors")))
    ended = read_fake_score(os.path.join(second, "fake_score.safetensors"))
    assert started.keys() == ended.keys()
    for key in started:
        torch.testing.assert_close(ended[key], started[key], rtol=1e-5, atol=1e-6)
    teacher = build_tiny_teacher().unet.state_dict()
    assert any(not torch.allclose(started[f"unet.{k}"], v) for k, v in teacher.items())  # lr 1e-2 moved the first run's
    from safetensors.torch import load_file

    generator = load_file(os.path.join(second, "export", "unet", "diffusion_pytorch_model.safetensors"))
    initial = load_file(os.path.join(first, "export", "unet", "diffusion_pytorch_model.safetensors"))
    for key in initial:
        torch.testing.assert_close(generator[key], initial[key], rtol=1e-5, atol=1e-6)


# ------------------------------------------------------------------------------------------------ bad configs
def test_bad_configs_fail_before_workers_start(ray_cluster, shared_pairs, tmp_path, s3_server):
    """The refusals that need a cluster's storage or the pairs (pure-value ones are tested in test_config.py)."""
    pairs_uri, prompts = shared_pairs
    out = str(tmp_path / "run")
    cases = [
        (dict(pairs=pairs_uri, resolution=64), "latent_shape: [4, 8, 8] there, [4, 16, 16] now"),
        (dict(pairs=pairs_uri, guidance_scale=8.0), "guidance_scale: 3.0 there, 8.0 now"),
        (dict(output="s3://no-such-bucket-dmd/run"), "does not exist"),
        (dict(pairs=str(tmp_path / "nothing-here")), "does not exist"),
        (dict(teacher=str(tmp_path / "no-teacher")), "does not exist"),
    ]
    for overrides, message in cases:
        cfg = dataclasses.replace(small(out, pairs_uri, prompts=prompts), **overrides)
        with pytest.raises(Exception, match=message.replace("[", r"\[").replace("]", r"\]")):
            distill(cfg)
    assert not os.path.exists(os.path.join(out, "train"))  # no worker ever started


def test_a_worker_error_no_retry_can_fix_surfaces_as_itself(ray_cluster, prompts_file, tmp_path):
    """A teacher whose weights break after the driver's checks: the workers' TeacherNotFoundError ends the run (the
    failure policy does not retry it: see test_config.py) and reaches the caller as itself."""
    from dmd_ray.sd.architectures import build_tiny_teacher
    from dmd_ray.sd.resolve import TeacherNotFoundError

    folder = str(tmp_path / "teacher")
    build_tiny_teacher().save(folder)
    pairs_uri = str(tmp_path / "pairs")
    generate_pairs(PairsConfig(teacher=folder, prompts=prompts_file, num_pairs=8, shard_size=8, steps=2, sampler="ddim", out=pairs_uri))
    with open(os.path.join(folder, "unet", "diffusion_pytorch_model.safetensors"), "wb") as f:
        f.write(b"not safetensors")  # the configs the driver reads are intact
    cfg = small(str(tmp_path / "run"), pairs_uri, prompts=prompts_file, teacher=folder, pair_steps=2, num_workers=1,
                dm_batch_size=2, reg_batch_size=2, max_failures=3)
    with pytest.raises(TeacherNotFoundError, match="could not load the folder"):
        distill(cfg)
