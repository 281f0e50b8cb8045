"""The shapes domain, its judge, the packaged demo teacher and generator, and the teacher-training job (CPU)."""

import pytest
import torch

from dmd_ray.demos import shapes


def test_prompts_round_trip_and_cover_the_domain():
    scenes = shapes.full_scenes()
    assert len(scenes) == len(set(scenes)) == 2 * 6 * 3 * 5
    assert all(shapes.parse_prompt(s.prompt) == s for s in scenes)
    assert sorted(shapes.evaluation_prompts()) == sorted(s.prompt for s in scenes)
    assert shapes.parse_prompt("A Red circle") == shapes.Scene("circle", "red")


@pytest.mark.parametrize("prompt, problem", [
    ("a purple circle", "unknown colour 'purple'"),
    ("a red circle on a red background", "same colour"),
    ("two red circles", "not a shapes prompt"),
    ("", "not a shapes prompt"),
])
def test_bad_prompts_are_named(prompt, problem):
    with pytest.raises(ValueError, match=problem):
        shapes.parse_prompt(prompt)


def test_render_is_deterministic_varied_and_in_range():
    scenes = [shapes.parse_prompt("a small red circle on a blue background")] * 8
    a, b, c = shapes.render(scenes, seed=1), shapes.render(scenes, seed=1), shapes.render(scenes, seed=2)
    assert a.shape == (8, 3, 32, 32) and a.min() >= -1 and a.max() <= 1
    assert torch.equal(a, b) and not torch.equal(a, c)
    assert (a[0] - a[1]).abs().max() > 0.5  # one prompt, many images: positions differ within a batch
    # the background is blue-ish and the shape red-ish: corners are mostly blue, the brightest red pixel is red
    corner = a[0, :, 0, 0]
    assert corner[2] > corner[0]


def test_unsaid_attributes_are_drawn_at_random():
    rendered = shapes.render([shapes.parse_prompt("a green square")] * 64, seed=0)
    backgrounds = {tuple((rendered[i, :, 0, 0] > 0).tolist()) for i in range(64)}
    assert len(backgrounds) >= 3


def test_builtin_prompt_file_is_the_evaluation_prompt_set():
    from dmd_ray.data.prompts import BUILTIN_PROMPTS, read_prompts

    assert read_prompts(BUILTIN_PROMPTS) == shapes.evaluation_prompts()


def test_packaged_judge_reads_clean_renders():
    judge = shapes.load_classifier()
    assert shapes.classifier_accuracy(judge, num_images=512) >= 0.98


def test_demo_teacher_loads_offline_and_follows_prompts():
    """The packaged teacher (trained by jobs/train_teacher.py on an H100) through load_teacher("demo"): its guided
    samples match their prompts far above chance (chance of all four attributes: 1/180), and guidance helps."""
    from dmd_ray.sd.resolve import load_teacher
    from dmd_ray.sd.teacher_sampler import PairSampler

    judge, teacher = shapes.load_classifier(), load_teacher("demo")
    prompts = shapes.evaluation_prompts()[:48]
    accuracy = {}
    for guidance in (3.0, 1.0):
        sampler = PairSampler(teacher, sampler="ddim", steps=25, guidance_scale=guidance, resolution=32, device=torch.device("cpu"), dtype=torch.float32)
        _, latents = sampler(prompts, list(range(len(prompts))))
        with torch.no_grad():
            accuracy[guidance] = shapes.prompt_accuracy(judge, teacher.decode(latents).clamp(-1, 1), prompts)
    assert accuracy[3.0] >= 0.4, accuracy
    assert accuracy[3.0] > accuracy[1.0], accuracy


def test_demo_generators_are_built_in_and_beat_the_teacher_in_one_step():
    """The packaged students as the evaluation job loads them (BENCHMARKS.md, 1,440 samples): `demo`, the best one-step
    student (regression, DMD and DMD2's DM + GAN on real renders, then regressed onto `demo-4step`'s deterministic
    samples, last with its pure noise read at t = 399, DMD2's timestep shift; FID 2.70 against the teacher's 2.69,
    accuracy 0.760), and `demo-4step`, DMD2's four-step generator trained from the teacher with backward simulation,
    then continued, run in its four steps with DDIM's deterministic re-noising (0.801, FID 2.50). Both follow prompts
    far above chance (1/180) and far better than the teacher's own network in one step (0.09), where distillation
    started."""
    import numpy as np

    from dmd_ray.config import EvalConfig
    from dmd_ray.demos.shapes_eval import ImageMaker
    from dmd_ray.sd.resolve import read_generator_info, resolve_generator

    info = read_generator_info(resolve_generator("demo"))
    lineage = [info]
    while "previous" in lineage[-1]:
        lineage.append(lineage[-1]["previous"])
    assert info["teacher"] == "demo" and info["recipe"]["target"] == "demo-4step" and info["generator_timestep"] == 399
    assert any(run["recipe"].get("dm_weight", 0) > 0 for run in lineage)  # DMD's term is in its history
    four_step = read_generator_info(resolve_generator("demo-4step"))
    assert four_step["generator_timesteps"] == [999, 749, 499, 249] and four_step["multi_step_sampler"] == "ddim"
    judge, prompts = shapes.load_classifier(), shapes.evaluation_prompts()[:90]
    rows = {"prompt": np.array(prompts), "seed": np.arange(len(prompts))}
    accuracy = {}
    for spec in ("demo", "demo-4step", "teacher-onestep:demo"):
        images = ImageMaker(spec, EvalConfig(guidance_scale=3.0))(rows)["image"]
        accuracy[spec] = shapes.prompt_accuracy(judge, torch.from_numpy(images).permute(0, 3, 1, 2).float() / 127.5 - 1, prompts)
    # on these 90 prompts they read 0.70 and 0.79, the teacher's network in one step 0.09
    assert accuracy["demo"] >= 0.65, accuracy
    assert accuracy["demo"] >= accuracy["teacher-onestep:demo"] + 0.1, accuracy
    assert accuracy["demo-4step"] >= max(0.75, accuracy["demo"] + 0.05), accuracy  # four steps still beat one


@pytest.mark.slow
def test_train_teacher_job_runs_resumes_and_refuses_another_recipe(ray_cluster, tmp_path):
    from dmd_ray.config import TeacherConfig
    from dmd_ray.demos.teacher_training import train_teacher
    from dmd_ray.sd.resolve import load_teacher

    cfg = TeacherConfig(output=str(tmp_path / "t"), vae_steps=3, unet_steps=3, batch_size=8, log_every=1, checkpoint_every=2)
    train_teacher(cfg)
    teacher = load_teacher(str(tmp_path / "t" / "teacher"))
    assert teacher.vae.config.scaling_factor != 0.18215  # measured on the domain, not SD's constant
    assert teacher.unet.dtype == torch.float32  # stored in float16, loaded as asked
    images = teacher.decode(torch.randn(2, *teacher.latent_shape(32)))
    assert images.shape == (2, 3, 32, 32)

    # the same output with another recipe is refused instead of mixing two runs
    with pytest.raises(Exception, match="another recipe"):
        train_teacher(TeacherConfig(**{**cfg.__dict__, "unet_steps": 5}))

    # going on from that teacher: its VAE is kept as it is, its UNet trains further
    train_teacher(TeacherConfig(**{**cfg.__dict__, "output": str(tmp_path / "t2"), "init_from": str(tmp_path / "t" / "teacher"),
                                                                   "ema_decay": 0.0, "warmup_steps": 1, "save_dtype": "float32"}))
    continued = load_teacher(str(tmp_path / "t2" / "teacher"))
    assert continued.vae.config.scaling_factor == teacher.vae.config.scaling_factor
    assert all(torch.equal(a, b) for a, b in zip(continued.vae.state_dict().values(), teacher.vae.state_dict().values()))
    assert not all(torch.equal(a, b) for a, b in zip(continued.unet.state_dict().values(), teacher.unet.state_dict().values()))


@pytest.mark.slow
@pytest.mark.parametrize("target, recipe", [("demo-4step", {"target_sampler": "ddim"}),
                                            ("teacher:demo", {"target_sampler": "pndm", "target_steps": 2, "target_guidance": 3.0})])
def test_regression_onto_a_few_step_student_or_the_teachers_ode_exports_a_one_step_student(target, recipe, tmp_path):
    # benchmarks/regress_onto_steps.py for one step of batch 2: the export records its recipe and timestep, and
    # the probe's history sits beside it
    import json
    import os
    import subprocess
    import sys

    from dmd_ray.sd.resolve import read_generator_info

    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    out = tmp_path / "student"
    command = [sys.executable, "benchmarks/regress_onto_steps.py", "--target", target, "--target-steps", "2", "--steps", "1", "--batch", "2",
               "--probe-every", "1", "--probe-samples", "6", "--out", str(out)]
    result = subprocess.run(command, cwd=repo, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    info = read_generator_info(str(out))
    assert info["generator_timestep"] == 399 and info["recipe"]["target"] == target  # `demo`'s own timestep
    assert recipe.items() <= info["recipe"].items()
    history = [json.loads(line) for line in open(out / "metrics.jsonl")]
    assert [row["step"] for row in history] == [0, 1] and history[1]["loss_reg"] > 0
