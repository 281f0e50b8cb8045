"""Configs and the refusals that stop a job before any work, without a cluster: pure-value checks, the command line,
pairs made with another config, weights the machine cannot get, the failure policy, and the import layers."""
import dataclasses
import os
import subprocess
import sys

import pytest
import torch

from dmd_ray.config import DistillConfig, EvalConfig, PairsConfig, TeacherConfig, ToyConfig, cli_main
from dmd_ray.data import pairs
from dmd_ray.typed_config import ConfigError, from_dict, parse_args

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


# ------------------------------------------------------------------------------------------------ values
@pytest.mark.parametrize("overrides, message", [
    (dict(zero_stage=4), "zero_stage must be 0, 1, 2 or 3"),
    (dict(gpus_per_worker=0.0), "gpus_per_worker must be a fraction"),
    (dict(export_dtype="int8"), "export_dtype must be float32, float16 or bfloat16"),
    (dict(time_limit_minutes=-1.0), "time_limit_minutes must be >= 0"),
    (dict(num_workers=2, dm_batch_size=3), "dm_batch_size 3 does not divide over 2 workers"),
    (dict(num_workers=2, reg_batch_size=1), "reg_batch_size 1 does not divide over 2 workers"),
    (dict(dm_weight=0.0, lambda_reg=0.0), "would learn nothing"),
    (dict(precision="fp16"), "fp16 diverges"),
    (dict(use_gpu="maybe"), "use_gpu must be auto, true or false"),
    (dict(max_steps=0, log_every=0), "max_steps must be >= 1"),
    (dict(ema_decay=1.0), r"ema_decay must be in \[0, 1\)"),
    (dict(ema_decay=0.999, zero_stage=3), "ema_decay needs the generator's whole weights"),
    (dict(gan_weight=1e-3, gan_features="up"), "gan_features must be one of bottleneck, decoder, got 'up'"),
])
def test_distill_config_values_are_checked(overrides, message):
    with pytest.raises(ConfigError, match=message):
        DistillConfig(**overrides).check()


def test_every_problem_is_named_at_once_and_good_defaults_pass():
    for cls in (DistillConfig, EvalConfig, TeacherConfig, ToyConfig):
        cls().check()
    PairsConfig(prompts="p.txt").check()
    with pytest.raises(ConfigError) as e:
        PairsConfig(prompts="", num_pairs=0, sampler="heun2", dtype="int4").check()
    assert all(word in str(e.value) for word in ("prompts is required", "num_pairs", "sampler must be one of", "dtype must be"))
    with pytest.raises(ConfigError, match="unknown variants"):
        ToyConfig(variants=("dmd", "gan")).check()
    with pytest.raises(ConfigError) as e:
        DistillConfig(compile="fastest", pair_compile="always").check()
    assert "compile must be one of" in str(e.value) and "pair_compile must be one of" in str(e.value)


def test_one_coercion_for_jobs_and_service():
    """The service's keys take the jobs' spellings: the same booleans, numbers and lists from strings."""
    sys.path.insert(0, REPO)
    from serve.config import ServiceConfig

    for spelling, value in (("on", True), ("yes", True), ("1", True), ("off", False), ("no", False), ("false", False)):
        assert from_dict(DistillConfig, {"export": spelling}).export is value
        assert ServiceConfig.from_args({"warmup": spelling}).warmup is value
    with pytest.raises(ConfigError, match="expects true/false"):
        from_dict(DistillConfig, {"export": "maybe"})
    with pytest.raises(ConfigError, match="expects true/false"):
        ServiceConfig.from_args({"warmup": "maybe"})
    assert from_dict(DistillConfig, {"sample_prompts": "a, b"}).sample_prompts == ("a", "b")
    assert from_dict(DistillConfig, {"compile": True, "max_steps": "08"}).compile == "true"  # YAML's true for a true/false/auto key
    with pytest.raises(ConfigError, match="expects a string, got None"):
        ServiceConfig.from_args({"cache_dir": None})  # `cache_dir:` left empty in YAML is not the folder "None"


def test_command_line_errors_exit_2_before_the_job_runs(tmp_path, capsys):
    def never(cfg):
        raise AssertionError("the job must not start")

    with pytest.raises(SystemExit) as e:
        cli_main("distill", DistillConfig, never, ["--output", str(tmp_path), "--learning-rate", "1"])
    assert e.value.code == 2 and "unrecognized arguments" in capsys.readouterr().err
    bad = tmp_path / "bad.yaml"
    bad.write_text("teacher: tiny\nlearning_rate: 1\n")
    with pytest.raises(SystemExit) as e:
        parse_args(DistillConfig, ["--config", str(bad)])
    assert e.value.code == 2 and "unknown config key(s) ['learning_rate']" in capsys.readouterr().err
    assert cli_main("distill", DistillConfig, never, ["--zero-stage", "5"]) == 2
    assert "zero_stage must be 0, 1, 2 or 3" in capsys.readouterr().err
    assert cli_main("toy2d", ToyConfig, never, ["--batch", "0"]) == 2


# ------------------------------------------------------------------------------------------------ refusals
def fake_pairs(out: str, prompts: list[str], guidance_scale: float = 3.0, teacher: str = "tiny", sampler: str = "ddim", steps: int = 4) -> None:
    """A complete pairs dataset on local disk, as generate_pairs would record it, without running a teacher."""
    layout = pairs.ShardLayout(8, 8)
    make = lambda p, seeds: (torch.zeros(len(seeds), 4, 8, 8), torch.zeros(len(seeds), 4, 8, 8))  # noqa: E731
    provenance = {"teacher": teacher, "sampler": sampler, "steps": steps, "guidance_scale": guidance_scale}
    pairs.ShardWriter(out, layout, prompts, 0, make, 8, provenance).write_shard(0)
    config = pairs.manifest_config(**provenance, resolution=32, latent_shape=(4, 8, 8), dtype=torch.float32, seed=0, layout=layout, prompts=prompts)
    pairs.write_manifest(out, config, [0])


def test_pairs_of_another_teacher_guidance_sampler_steps_or_prompts_are_refused(tmp_path, prompts_file):
    from dmd_ray.data.prompts import read_prompts
    from dmd_ray.distributed.distill_driver import prepare

    prompts = read_prompts(prompts_file)
    run = DistillConfig(teacher="tiny", prompts=prompts_file, output=str(tmp_path / "run"), pair_sampler="ddim", pair_steps=4, regression_space="latent")
    matching = str(tmp_path / "matching")
    fake_pairs(matching, prompts)
    assert prepare(dataclasses.replace(run, pairs=matching)).pairs == matching
    for name, kwargs, fix in [
        ("guidance_scale", dict(guidance_scale=8.0), "--guidance-scale"),
        ("teacher", dict(teacher="demo"), "--teacher"),
        ("sampler", dict(sampler="pndm"), "--pair-sampler"),
        ("steps", dict(steps=50), "--pair-steps"),
        ("prompts_sha256", dict(prompts=prompts[:1]), "--prompts"),
    ]:
        other = str(tmp_path / name)
        fake_pairs(other, **{"prompts": prompts, **kwargs})
        with pytest.raises(ConfigError, match=rf"made with another teacher or config than this run's \(.*{name}: .* there, .* now.*\).*{fix}"):
            prepare(dataclasses.replace(run, pairs=other))
    assert not os.path.exists(os.path.join(run.output, "train"))


def test_pairs_of_a_few_step_student_are_taken_when_it_is_named_the_pair_teacher(tmp_path, prompts_file):
    # pairs made by a student of the teacher (its deterministic chain) are another distribution than the teacher's ODE
    # pairs: refused unless --pair-teacher names it, with the guidance they were made at
    import copy

    from dmd_ray.data.prompts import read_prompts
    from dmd_ray.distributed.distill_driver import pairs_config, prepare
    from dmd_ray.sd.architectures import build_tiny_teacher
    from dmd_ray.sd.export import export_generator

    teacher = build_tiny_teacher()
    student = export_generator(teacher, copy.deepcopy(teacher.unet), str(tmp_path / "two-step"), 999, timesteps=[999, 499], sampler="ddim")
    prompts = read_prompts(prompts_file)
    made = str(tmp_path / "student-pairs")
    fake_pairs(made, prompts, guidance_scale=1.0, teacher=student, sampler="ddim", steps=2)
    run = DistillConfig(teacher="tiny", prompts=prompts_file, output=str(tmp_path / "run"), pair_sampler="ddim", pair_steps=2,
                        regression_space="latent", pairs=made)
    with pytest.raises(ConfigError, match=r"another teacher or config than this run's \(.*teacher: .* there.*--pair-teacher"):
        prepare(run)
    with pytest.raises(ConfigError, match=r"guidance_scale: 1.0 there, 3.0 now"):
        prepare(dataclasses.replace(run, pair_teacher=student))
    named = dataclasses.replace(run, pair_teacher=student, pair_guidance_scale=1.0)
    plan = prepare(named)
    assert plan.pair_teacher == student and named.recipe()["pair_teacher"] == student
    implied = pairs_config(dataclasses.replace(named, pairs=""), prepare(dataclasses.replace(named, pairs="")))
    assert (implied.teacher, implied.guidance_scale, implied.sampler, implied.steps) == (student, 1.0, "ddim", 2)
    lcm = export_generator(teacher, copy.deepcopy(teacher.unet), str(tmp_path / "lcm"), 999, timesteps=[999, 499], sampler="lcm")
    with pytest.raises(ConfigError, match="fresh noise between its steps"):
        prepare(dataclasses.replace(named, pair_teacher=lcm, pairs=""))
    with pytest.raises(ConfigError, match="pair_guidance_scale must be >= 0, or -1"):
        dataclasses.replace(named, pair_guidance_scale=-2.0).check()


def test_the_same_teacher_under_another_path_is_the_same_teacher(tmp_path):
    """`ray job submit` runs the project from a copy: pairs made from one path match a run that names the other."""
    import shutil

    from dmd_ray.distributed.distill_driver import same_teacher
    from dmd_ray.sd.architectures import build_tiny_teacher

    build_tiny_teacher().save(str(tmp_path / "a"))
    shutil.copytree(tmp_path / "a", tmp_path / "copy")
    build_tiny_teacher(seed=0, prediction_type="v_prediction").save(str(tmp_path / "other"))
    assert same_teacher(str(tmp_path / "a"), str(tmp_path / "copy")) and same_teacher("tiny", "tiny")
    assert not same_teacher(str(tmp_path / "a"), str(tmp_path / "other")) and not same_teacher("tiny", "demo")


def test_lpips_weights_the_machine_cannot_get_are_refused_with_both_fixes(tmp_path, monkeypatch, prompts_file):
    """No cached backbone and no route to it: refused on the driver, before pairs or workers, naming the fixes."""
    from dmd_ray.distributed.distill_driver import prepare
    from dmd_ray.sd import weights

    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch-home"))  # an empty cache
    monkeypatch.setattr(weights, "reachable", lambda url, timeout=weights.REACH_TIMEOUT_S: False)
    run = DistillConfig(teacher="tiny", prompts=prompts_file, output=str(tmp_path / "run"), regression_space="pixel", lpips_backbone="vgg")
    with pytest.raises(ConfigError, match=r"vgg16-397923af.pth.*--lpips-pretrained-backbone false.*put it at .*torch-home"):
        prepare(run)
    assert not os.path.exists(os.path.join(run.output, "pairs"))
    prepare(dataclasses.replace(run, lpips_pretrained_backbone=False))  # the offline fix works
    path = weights.lpips_backbone_file("vgg")[1]
    os.makedirs(os.path.dirname(path))
    open(path, "wb").close()
    prepare(run)  # so does the cached file


def test_reachability_is_asked_of_the_network_and_bounded():
    from dmd_ray.sd.weights import reachable

    assert not reachable("http://127.0.0.1:9/vgg16.pth", timeout=2)  # nothing listens on the discard port


def test_worker_errors_no_retry_can_fix_end_the_run_and_others_are_retried():
    from ray.train import FailureConfig
    from ray.train.v2._internal.execution.failure_handling import FailureDecision
    from ray.train.v2.api.exceptions import WorkerGroupError

    from dmd_ray.data.storage import StorageError
    from dmd_ray.distributed.cluster import failure_policy_class
    from dmd_ray.sd.resolve import TeacherNotFoundError

    policy = failure_policy_class()(FailureConfig(max_failures=3))
    for final in (ConfigError("bad"), TeacherNotFoundError("missing weights"), PermissionError("denied"), StorageError("no bucket")):
        assert policy.make_decision(WorkerGroupError("failed", {0: RuntimeError("collateral"), 1: final})) == FailureDecision.RAISE
    assert policy.make_decision(WorkerGroupError("failed", {1: RuntimeError("worker killed")})) == FailureDecision.RETRY


def test_the_embedded_cluster_stops_printing_the_state_api_warning_and_nothing_else():
    from ray._private import ray_logging

    from dmd_ray.distributed.cluster import STATE_API_WARNING, hide_state_api_warnings

    assert hide_state_api_warnings() and hide_state_api_warnings()  # init_ray calls it; a second call changes nothing
    lines = [f"{STATE_API_WARNING}. State API may be temporarily unavailable. Continuing to monitor.", "[distill] step 10  loss_dm 0.29"]
    for pid, (is_err, dedup) in enumerate([(True, ray_logging.stderr_deduplicator), (False, ray_logging.stdout_deduplicator)]):
        batch = {"ip": "127.0.0.1", "pid": 4005 + pid, "is_err": is_err, "job": "01000000", "actor_name": "", "task_name": "", "lines": lines}
        assert [line for b in dedup.deduplicate(batch) for line in b["lines"]] == lines[1:]


# ------------------------------------------------------------------------------------------------ layers
def test_the_method_layer_loads_neither_ray_nor_deepspeed_nor_diffusers():
    code = ("import sys, dmd_ray.method.schedule, dmd_ray.method.denoiser, dmd_ray.method.generator, dmd_ray.method.losses, "
            "dmd_ray.method.objective, dmd_ray.method.optim, dmd_ray.method.sampling; "
            "print(sorted(m for m in ('ray', 'deepspeed', 'diffusers') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=120).stdout
    assert out.strip() == "[]"


LAYERS = ["method", "data", "sd", "config", "distributed", "demos"]  # each may import those before it (and base modules)
BASE = {"dmd_ray", "dmd_ray.typed_config", "dmd_ray.images"}


def test_every_import_points_down():
    import ast

    root = os.path.join(REPO, "dmd_ray")
    for dirpath, _, files in os.walk(root):
        for name in files:
            if not name.endswith(".py"):
                continue
            path = os.path.join(dirpath, name)
            module = "dmd_ray." + os.path.relpath(path, root)[:-3].replace(os.sep, ".").removesuffix(".__init__")
            layer = module.split(".")[1]
            if layer not in LAYERS:
                continue
            tree = ast.parse(open(path).read())
            type_only = {id(n) for block in ast.walk(tree) if isinstance(block, ast.If) and ast.unparse(block.test) == "TYPE_CHECKING" for n in ast.walk(block)}
            for node in ast.walk(tree):
                if id(node) in type_only:  # annotations only: never imported at run time
                    continue
                targets = [node.module] if isinstance(node, ast.ImportFrom) and node.module else [a.name for a in getattr(node, "names", [])] if isinstance(node, ast.Import) else []
                for target in targets:
                    if not target.startswith("dmd_ray.") or target in BASE:
                        continue
                    other = target.split(".")[1]
                    assert other in LAYERS and LAYERS.index(other) <= LAYERS.index(layer), f"{module} imports {target}"


def test_in_training_evaluation_without_a_judge_is_refused():
    from dmd_ray.distributed.distill_driver import distill

    with pytest.raises(ConfigError, match="eval_every needs a judge"):
        distill(DistillConfig(eval_every=100))


def test_a_resume_under_another_zero_stage_or_worker_count_is_refused(tmp_path):
    """The checkpoint's engine states fit one ZeRO stage (and, under ZeRO 1-3, one worker count; under ZeRO-0, one
    flat_optimizer setting): refused on the driver."""
    import json

    from dmd_ray.distributed.distill_driver import check_resume_world_size

    checkpoint = tmp_path / "run" / "distill" / "checkpoint_step_0000100"
    checkpoint.mkdir(parents=True)
    (checkpoint / "trainer_state.json").write_text(json.dumps({"world_size": 2, "config": {"zero_stage": 2}}))
    base = dict(output=str(tmp_path / "run"), run_name="distill")
    check_resume_world_size(DistillConfig(**base, zero_stage=2, num_workers=2))  # the same: resumes
    with pytest.raises(ConfigError, match="written under ZeRO-2.*Resume with --zero-stage 2"):
        check_resume_world_size(DistillConfig(**base, zero_stage=0, num_workers=2))
    with pytest.raises(ConfigError, match="written by 2 worker.*--num-workers 2"):
        check_resume_world_size(DistillConfig(**base, zero_stage=2, num_workers=1))
    (checkpoint / "trainer_state.json").write_text(json.dumps({"world_size": 2, "config": {"zero_stage": 0, "flat_optimizer": True}}))
    check_resume_world_size(DistillConfig(**base, zero_stage=0, num_workers=1))  # ZeRO-0: any worker count
    # a ZeRO-0 checkpoint from before flat_optimizer (no key: one optimizer state per parameter) needs it off
    (checkpoint / "trainer_state.json").write_text(json.dumps({"world_size": 1, "config": {"zero_stage": 0}}))
    with pytest.raises(ConfigError, match="written with flat_optimizer False.*Resume with --flat-optimizer false"):
        check_resume_world_size(DistillConfig(**base, zero_stage=0))
    check_resume_world_size(DistillConfig(**base, zero_stage=0, flat_optimizer=False))


def test_a_generator_can_start_from_an_exported_student_of_the_teachers_architecture(tmp_path, capsys):
    """init_generator (regression pre-training, then DMD): the student's weights start the generator; a folder that is
    no exported student, or one of another architecture, is refused by the driver before any worker starts; a student
    of another step count is allowed with a note (a one-step student starts a multi-step run badly); a one-step student
    continues at its own input timestep unless the run names another."""
    import torch

    from dmd_ray.distributed.distill_driver import prepare
    from dmd_ray.distributed.distill_worker import initial_generator
    from dmd_ray.sd.resolve import load_teacher, read_generator_info, resolve_generator

    cfg = DistillConfig(teacher="demo", init_generator="demo", regression_space="latent", output=str(tmp_path / "run"))
    prepare(cfg)
    teacher, student = load_teacher("demo"), load_teacher(resolve_generator("demo"))
    start = initial_generator(cfg, teacher)
    for (name, a), b in zip(start.state_dict().items(), student.unet.state_dict().values()):
        assert torch.equal(a, b), name
    assert initial_generator(dataclasses.replace(cfg, init_generator=""), teacher) is teacher.unet
    assert cfg.recipe()["init_generator"] == "demo"
    with pytest.raises(ConfigError, match="another UNet than the teacher 'tiny'.*block_out_channels"):
        prepare(dataclasses.replace(cfg, teacher="tiny"))
    with pytest.raises(ConfigError, match="not an exported one-step generator"):
        prepare(dataclasses.replace(cfg, init_generator=str(tmp_path)))
    assert "note: init_generator" not in capsys.readouterr().out
    prepare(dataclasses.replace(cfg, generator_steps=4, lambda_reg=0.0))
    assert "'demo' was trained as a 1-step generator and this run trains a 4-step one" in capsys.readouterr().out
    prepare(dataclasses.replace(cfg, init_generator="demo-4step", generator_steps=4, lambda_reg=0.0))
    assert "note: init_generator" not in capsys.readouterr().out
    # a one-step student continues at the input timestep it was trained at (the built-in demo: 399, DMD2's shift),
    # unless the run names another (with a note)
    import copy

    from dmd_ray.sd.dmd import one_step_timestep
    from dmd_ray.sd.export import export_generator

    assert one_step_timestep(cfg, 1000) == 399 == read_generator_info(resolve_generator("demo"))["generator_timestep"]
    at_999 = export_generator(teacher, copy.deepcopy(student.unet), str(tmp_path / "at-999"), timestep=999)
    assert one_step_timestep(dataclasses.replace(cfg, init_generator=at_999), 1000) == 999
    assert one_step_timestep(dataclasses.replace(cfg, init_generator=""), 1000) == 999
    assert one_step_timestep(dataclasses.replace(cfg, generator_timestep=599), 1000) == 599
    prepare(cfg)
    assert "note: init_generator" not in capsys.readouterr().out
    prepare(dataclasses.replace(cfg, generator_timestep=599))
    assert "trained reading its pure noise at t = 399; this run moves it to t = 599" in capsys.readouterr().out


def test_the_jobs_refuse_bad_input_before_they_start_a_cluster(tmp_path, capsys):
    """`jobs/distill.py`, `jobs/generate_pairs.py`, `jobs/evaluate.py` and `jobs/train_teacher.py` run every check
    before they join or start Ray: a refused run exits with code 2 and its message, and no cluster was started for it."""
    import importlib.util

    import ray

    def job(name):
        spec = importlib.util.spec_from_file_location(name, os.path.join(REPO, "jobs", f"{name}.py"))
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        return module.main

    assert job("distill")(["--teacher", "demo", "--init-generator", str(tmp_path), "--regression-space", "latent", "--eval-every", "0",
                           "--output", str(tmp_path / "run")]) == 2
    assert "not an exported one-step generator" in capsys.readouterr().err
    (tmp_path / "prompts.txt").write_text("a red circle\n")
    assert job("generate_pairs")(["--teacher", str(tmp_path / "no-teacher"), "--prompts", str(tmp_path / "prompts.txt"), "--out", str(tmp_path / "pairs")]) == 2
    assert "no-teacher" in capsys.readouterr().err
    # an evaluation whose last model is missing: refused before the first is sampled
    assert job("evaluate")(["--model", f"teacher:demo,demo,{tmp_path / 'no-export'}", "--output", str(tmp_path / "eval")]) == 2
    assert "no-export" in capsys.readouterr().err
    assert job("train_teacher")(["--init-from", str(tmp_path / "no-teacher"), "--output", str(tmp_path / "teacher")]) == 2
    assert "no-teacher" in capsys.readouterr().err
    assert job("train_teacher")(["--init-from", "demo", "--prediction-type", "v_prediction", "--output", str(tmp_path / "teacher")]) == 2
    assert "predicts epsilon" in capsys.readouterr().err
    assert not ray.is_initialized()


def test_the_loop_reports_to_ray_train_only_with_checkpoints_the_last_step_and_report_every():
    """ray.train.report waits for Ray Train's controller (a 2 s poll): log steps read the losses and write
    metrics.jsonl, but report only when a checkpoint, the last step or report_every asks for it."""
    from dmd_ray.distributed.distill_worker import step_actions

    cfg = DistillConfig(max_steps=100, log_every=10, checkpoint_every=50, sample_every=0, eval_every=25, report_every=0)
    todo = {step: step_actions(cfg, step, last=step == cfg.max_steps) for step in range(1, cfg.max_steps + 1)}
    assert [s for s, t in todo.items() if t.log] == [10, 20, 25, 30, 40, 50, 60, 70, 75, 80, 90, 100]
    assert [s for s, t in todo.items() if t.checkpoint] == [50, 100]
    assert [s for s, t in todo.items() if t.report] == []  # the checkpoints carry the reports, the last step's too
    assert [s for s, t in todo.items() if t.evaluate] == [25, 50, 75, 100]
    assert not any(t.sample for t in todo.values())
    no_checkpoints = dataclasses.replace(cfg, checkpoint_every=0, report_every=30)
    assert [s for s in range(1, 101) if step_actions(no_checkpoints, s, last=s == 100).report] == [30, 60, 90, 100]
    stopped_early = step_actions(dataclasses.replace(cfg, checkpoint_every=0), 37, last=True)  # the time limit
    assert stopped_early.report and stopped_early.log and stopped_early.evaluate
    with pytest.raises(ConfigError, match="report_every must be >= 0"):
        DistillConfig(report_every=-1).check()


def test_gan_renders_need_prompts_the_shapes_renderer_can_draw(tmp_path):
    """--gan-real renders: without a renderer, or with prompts outside the shapes domain, refused on the driver
    before any work, naming the prompt."""
    from dmd_ray.demos.shapes import Renderer
    from dmd_ray.distributed.distill_driver import distill, prepare

    other = tmp_path / "other.txt"
    other.write_text("a red circle\na photo of a cat\n")
    run = DistillConfig(teacher="tiny", prompts=str(other), output=str(tmp_path / "run"), regression_space="latent", gan_weight=1e-3, gan_real="renders")
    with pytest.raises(ConfigError, match="gan_real renders needs the domain's real images"):
        distill(run)
    with pytest.raises(ConfigError, match="gan_real renders .*not a shapes prompt: 'a photo of a cat'"):
        prepare(run, Renderer())
    prepare(dataclasses.replace(run, gan_real="pairs"), Renderer())  # the teacher's outputs need no renderer
    other.write_text("a red circle\na large blue square on a white background\n")
    prepare(run, Renderer())
    assert not os.path.exists(os.path.join(run.output, "pairs"))
