"""jobs/evaluate.py end to end on CPU: Ray Data batch inference, metrics in the judge's feature space, the grid."""
import json

import numpy as np
import pytest

from dmd_ray.config import EvalConfig


def test_image_maker_is_deterministic_per_seed():
    from dmd_ray.demos.shapes_eval import ImageMaker

    cfg = EvalConfig(steps=3)
    maker = ImageMaker("teacher:demo", cfg)
    batch = {"prompt": np.array(["a red circle", "a blue square"]), "seed": np.array([5, 6])}
    first, alone = maker(batch)["image"], maker({"prompt": batch["prompt"][:1], "seed": batch["seed"][:1]})["image"]
    assert first.shape == (2, 32, 32, 3) and first.dtype == np.uint8
    assert np.array_equal(maker(batch)["image"], first)
    # another batch size may take other CPU kernels (summation order): at most a rounding step of uint8 apart
    assert np.abs(first[0].astype(int) - alone[0].astype(int)).max() <= 1
    other_seed = maker({"prompt": batch["prompt"][:1], "seed": np.array([7])})["image"]
    assert np.abs(other_seed[0].astype(int) - alone[0].astype(int)).mean() > 1  # another seed, another image


@pytest.mark.slow
def test_evaluate_job_end_to_end(ray_cluster, tmp_path):
    from dmd_ray.demos.shapes_eval import evaluate
    from dmd_ray.sd.export import export_generator
    from dmd_ray.sd.resolve import load_teacher

    # an exported one-step generator: the demo teacher's own network (what DMD starts from), through the export path
    teacher = load_teacher("demo")
    export = str(tmp_path / "export")
    export_generator(teacher, teacher.unet, export, timestep=teacher.scheduler.config.num_train_timesteps - 1)
    cfg = EvalConfig(model=f"teacher:demo,{export}", num_samples=200, steps=8, sampler="ddim", batch_size=50,
                     output=str(tmp_path / "eval"), paired_against="teacher:demo")
    summary = evaluate(cfg)
    on_disk = json.loads((tmp_path / "eval" / "metrics.json").read_text())
    assert on_disk["models"] == json.loads(json.dumps(summary["models"]))
    teacher_row, onestep_row = summary["models"]["teacher:demo"], summary["models"][export]
    for row in (teacher_row, onestep_row):
        assert set(row) >= {"fid", "kid", "prompt_accuracy", "lpips_diversity", "num_samples", "fid_ci95", "prompt_accuracy_ci95"}
        assert row["num_samples"] == 200 and 0 <= row["prompt_accuracy"] <= 1 and row["lpips_diversity"] > 0
        assert row["prompt_accuracy_ci95"][0] <= row["prompt_accuracy"] <= row["prompt_accuracy_ci95"][1]
    # the guided multi-step teacher follows prompts far better than its own network run once, unguided
    assert teacher_row["prompt_accuracy"] > onestep_row["prompt_accuracy"] + 0.1
    assert teacher_row["fid"] < onestep_row["fid"]
    paired = onestep_row["paired_against teacher:demo"]  # the one-step row minus the teacher's, on the same samples
    assert paired["prompt_accuracy_difference"] == pytest.approx(onestep_row["prompt_accuracy"] - teacher_row["prompt_accuracy"])
    assert paired["fid_difference"] == pytest.approx(onestep_row["fid"] - teacher_row["fid"], rel=1e-3)
    assert paired["prompt_accuracy_difference_ci95"][1] < 0 < paired["fid_difference_ci95"][0]
    assert "paired_against teacher:demo" not in teacher_row
    assert (tmp_path / "eval" / "grid.png").stat().st_size > 1000


def test_training_probe_scores_the_generators_images_of_its_own_rows():
    """The in-training probe (DistillConfig.eval_every): renders of its rows score as the domain's real images do,
    noise scores far worse; its rows are the first rows of jobs/evaluate.py."""
    import torch

    from dmd_ray.demos import shapes
    from dmd_ray.demos.shapes_eval import TrainingProbe

    probe = TrainingProbe(num_samples=60, seed=3)
    prompts, seeds = probe.rows()
    assert len(prompts) == 60 and seeds == list(range(3, 63)) and prompts[:2] == shapes.evaluation_prompts()[:2]
    renders = ((shapes.render([shapes.parse_prompt(p) for p in prompts], seed=7) + 1) * 127.5).round().to(torch.uint8)
    good = probe(renders.permute(0, 2, 3, 1).numpy(), prompts)
    noise = probe(np.random.default_rng(0).integers(0, 256, renders.permute(0, 2, 3, 1).shape, dtype=np.uint8), prompts)
    assert set(good) == {"fid", "prompt_accuracy"}
    assert good["prompt_accuracy"] > 0.9 and noise["prompt_accuracy"] < 0.2
    assert good["fid"] < noise["fid"]
    # the full metrics are a function of the images: KID's random subsets are drawn from a fixed seed
    from dmd_ray.demos.shapes_eval import metrics

    images = renders.permute(0, 2, 3, 1).numpy()
    torch.manual_seed(1)
    first = metrics(images, prompts, probe._judge, probe._real, intervals=False)
    torch.manual_seed(2)
    assert metrics(images, prompts, probe._judge, probe._real, intervals=False) == first


def test_comparison_grid_puts_each_model_under_the_renders():
    """The README demo's last picture (jobs/distill.py writes it for the demo teacher): renders, then one row per model."""
    from dmd_ray.demos.shapes_eval import comparison_grid

    picture = comparison_grid(["teacher-onestep:demo", "demo"], columns=3)
    assert picture.shape == (3 * 32, 3 * 32, 3) and picture.dtype == np.uint8
    assert picture[32:64].std() > 0 and not np.array_equal(picture[32:64], picture[64:96])


def test_frechet_distance_and_its_bootstrap_interval():
    """FID's closed form on known Gaussians, and bootstrap intervals that hold the estimate and narrow with samples."""
    import torch

    from dmd_ray.demos.shapes_eval import bootstrap_intervals, frechet_distance

    eye, shift = torch.eye(3, dtype=torch.float64), torch.tensor([3.0, 0, 4.0], dtype=torch.float64)
    assert frechet_distance(shift, eye, torch.zeros(3, dtype=torch.float64), eye) == pytest.approx(25.0)
    a, b = torch.diag(torch.tensor([1.0, 4.0, 9.0], dtype=torch.float64)), torch.diag(torch.tensor([4.0, 4.0, 1.0], dtype=torch.float64))
    assert frechet_distance(shift, a, shift, b) == pytest.approx(1 + 0 + 4)  # sum of (sqrt a_i - sqrt b_i)^2
    gen = torch.Generator().manual_seed(0)
    real = torch.randn(2000, 4, generator=gen, dtype=torch.float64)
    widths = []
    for n in (200, 2000):
        fake = torch.randn(n, 4, generator=gen, dtype=torch.float64) + 0.5
        correct = torch.rand(n, generator=gen) < 0.7
        ci = bootstrap_intervals(fake, real, correct, resamples=100)
        fid = frechet_distance(fake.mean(0), torch.cov(fake.T), real.mean(0), torch.cov(real.T))
        accuracy = float(correct.double().mean())
        assert sum(ci["fid_ci95"]) / 2 == pytest.approx(fid) and ci["fid_ci95"][0] < fid < ci["fid_ci95"][1]
        assert sum(ci["prompt_accuracy_ci95"]) / 2 == pytest.approx(accuracy)
        binomial = 1.96 * (accuracy * (1 - accuracy) / n) ** 0.5  # the accuracy's spread is a binomial one
        assert ci["prompt_accuracy_ci95"][1] - accuracy == pytest.approx(binomial, rel=0.3)
        widths.append(ci["fid_ci95"][1] - ci["fid_ci95"][0])
    assert widths[1] < widths[0] / 2


def test_a_run_history_plots_its_losses_and_evaluation():
    """<output>/metrics.png at the end of every run (run_records.plot_history): a PNG, with or without eval rows."""
    from dmd_ray.distributed.run_records import plot_history

    history = [{"step": s, "loss_dm": 1.0 / s, "loss_fake": 0.3, "loss_reg": 0.05} for s in range(10, 210, 10)]
    for row in history[4::5]:
        row.update(eval_fid=20.0 / row["step"], eval_prompt_accuracy=row["step"] / 400)
    for rows in (history, [{k: v for k, v in r.items() if not k.startswith("eval_")} for r in history]):
        png = plot_history(rows)
        assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 10_000


def test_attribute_accuracy_counts_only_prompts_that_name_the_attribute():
    """Per-attribute accuracy (metrics.json's shape/colour/size/background_accuracy): what a generator gets wrong."""
    from dmd_ray.demos import shapes
    from dmd_ray.demos.shapes_eval import attribute_accuracy

    said = [shapes.parse_prompt(p) for p in ("a small red circle on a blue background", "a red square", "a large green triangle")]
    seen = [shapes.Scene("circle", "red", "large", "blue"), shapes.Scene("circle", "red", "small", "white"), shapes.Scene("triangle", "blue", "large", "black")]
    assert attribute_accuracy(said, seen, "shape") == pytest.approx(2 / 3)
    assert attribute_accuracy(said, seen, "colour") == pytest.approx(2 / 3)
    assert attribute_accuracy(said, seen, "size") == pytest.approx(1 / 2)  # the second prompt names no size
    assert attribute_accuracy(said, seen, "background") == 1.0  # only the first names one
    assert np.isnan(attribute_accuracy(said[1:2], seen[1:2], "background"))


def test_shape_read_as_splits_each_prompted_shape_and_size_by_what_the_judge_saw():
    """metrics.json's shape_read_as: per prompted shape and size, the fractions read as each shape (the demo teacher
    turns most small squares into circles: BENCHMARKS.md)."""
    from dmd_ray.demos import shapes
    from dmd_ray.demos.shapes_eval import shape_read_as

    said = [shapes.parse_prompt(p) for p in ("a small red square", "a small blue square", "a red square")]
    seen = [shapes.Scene("circle", "red", "small", "white"), shapes.Scene("square", "blue", "small", "white"),
            shapes.Scene("triangle", "red", "large", "white")]
    assert shape_read_as(said, seen) == {"any square": {"circle": 0.0, "square": 0.0, "triangle": 1.0},
                                         "small square": {"circle": 0.5, "square": 0.5, "triangle": 0.0}}


def test_paired_intervals_separate_what_the_models_own_intervals_cannot():
    """Two models on the same prompts and seeds that differ on a few samples: their own accuracy intervals overlap,
    the paired interval of the difference is the exact difference +- a narrow spread and excludes 0."""
    import torch

    from dmd_ray.demos.shapes_eval import bootstrap_intervals, paired_intervals

    gen = torch.Generator().manual_seed(0)
    n = 1440
    real = torch.randn(n, 4, generator=gen, dtype=torch.float64)
    features = torch.randn(n, 4, generator=gen, dtype=torch.float64) + 0.3
    correct = torch.rand(n, generator=gen) < 0.64
    better = correct.clone()
    better[torch.nonzero(~correct).flatten()[:43]] = True  # 43 of the wrong samples right: +0.030
    baseline = {"features": features, "real_features": real, "correct": correct}
    other = {"features": features * 0.98, "real_features": real, "correct": better}
    own = [bootstrap_intervals(m["features"], real, m["correct"])["prompt_accuracy_ci95"] for m in (baseline, other)]
    assert own[1][0] < own[0][1]  # the two intervals overlap
    paired = paired_intervals(baseline, other)
    assert paired["prompt_accuracy_difference"] == pytest.approx(43 / n)
    low, high = paired["prompt_accuracy_difference_ci95"]
    assert 0 < low < 43 / n < high < 2 * 43 / n
    assert paired["fid_difference_ci95"][0] < paired["fid_difference"] < paired["fid_difference_ci95"][1]
    with pytest.raises(ValueError, match="need the same samples"):
        paired_intervals(baseline, {**other, "correct": better[:10]})
