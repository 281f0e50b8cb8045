"""The 2D toy: DMD through the core on a mixture of Gaussians, with exact metrics."""
import json
import os
from dataclasses import replace

import pytest
import torch

from dmd_ray.config import ToyConfig
from dmd_ray.demos import toy2d
from dmd_ray.demos.mixture import GaussianMixture, energy_distance, mode_statistics

KEYS = ("teacher_ode", "teacher_onestep", "dmd", "dmd_no_regression", "dmd_no_dm")


@pytest.fixture(scope="module")
def default_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("toy2d")
    assert toy2d.main(["--out", str(out), "--seed", "0"]) == 0
    with open(out / "metrics.json") as f:
        return json.load(f), out


@pytest.mark.slow
def test_default_ring_dmd_matches_teacher(default_run):
    metrics, out = default_run
    assert os.path.getsize(out / "samples.png") > 10_000
    for key in KEYS:
        m = metrics[key]
        assert {"energy_distance", "modes_covered", "modes_total", "mode_mass_error"} <= set(m)
        assert m["modes_total"] == 8 and len(m["mode_mass_error"]) == 8
    teacher, onestep, dmd = metrics["teacher_ode"], metrics["teacher_onestep"], metrics["dmd"]
    # the metric's own noise is small against what is compared
    assert metrics["energy_distance_noise_floor"] < 0.25 * teacher["energy_distance"]
    assert teacher["modes_covered"] == 8
    assert dmd["modes_covered"] == 8
    assert dmd["energy_distance"] <= 1.25 * teacher["energy_distance"]
    assert onestep["energy_distance"] >= 20 * dmd["energy_distance"]
    assert max(dmd["mode_mass_error"]) < 0.03


def test_runs_are_deterministic(tmp_path):
    cfg = ToyConfig(teacher_steps=60, distill_steps=20, num_pairs=256, eval_samples=500, sampler_steps=10, batch=64)
    mixture = GaussianMixture.create([[0, 0], [3, 1], [-1, 4]], 0.3, [0.5, 0.3, 0.2])
    a = toy2d.run(mixture, cfg, str(tmp_path / "a"))
    b = toy2d.run(mixture, cfg, str(tmp_path / "b"))
    for key in KEYS:
        assert a[key] == b[key]
    c = toy2d.run(mixture, replace(cfg, seed=1), str(tmp_path / "c"))
    assert c["dmd"]["energy_distance"] != a["dmd"]["energy_distance"]


@pytest.mark.parametrize(
    "bad,message",
    [
        ("{not json", "not valid JSON"),
        ('{"means": [[0, 0]]}', '"means" and "std"'),
        ('{"means": [[0, 0, 1]], "std": 1}', "pairs"),
        ('{"means": [[0, 0]], "std": -1}', "positive"),
        ('{"means": [[0, 0], [1, 1]], "std": 1, "weights": [1]}', "weights"),
        ('{"means": [[0, 0]], "std": 1, "colour": 2}', "unknown keys"),
    ],
)
def test_bad_target_is_a_clear_error(bad, message, capsys, tmp_path):
    assert toy2d.main(["--out", str(tmp_path), "--target", bad]) == 2
    assert message in capsys.readouterr().err
    assert not os.listdir(tmp_path)


def test_energy_distance_is_exact_for_the_mixture():
    mixture = GaussianMixture.ring()
    g = torch.Generator().manual_seed(0)
    same = [energy_distance(mixture.sample(20000, g), mixture) for _ in range(3)]
    assert max(abs(v) for v in same) < 3e-4  # unbiased: zero up to noise
    shifted = energy_distance(mixture.sample(20000, g) + torch.tensor([0.5, 0.0], dtype=torch.float64), mixture)
    assert shifted > 0.05
    # a point mass at the origin: D^2 = 2 E|Y| - E|Y - Y'|, estimated here independently by Monte Carlo
    y, y2 = mixture.sample(400_000, g), mixture.sample(400_000, g)
    reference = float(2 * y.norm(dim=1).mean() - (y - y2).norm(dim=1).mean())
    assert energy_distance(torch.zeros(1000, 2), mixture) == pytest.approx(reference, abs=0.01)


def test_mode_statistics():
    mixture = GaussianMixture.create([[0, 0], [10, 0]], 1.0, [0.75, 0.25])
    g = torch.Generator().manual_seed(0)
    stats = mode_statistics(mixture.sample(40000, g), mixture)
    assert stats["modes_covered"] == 2 and stats["mode_mass_error_max"] < 0.01
    one_mode = mode_statistics(torch.randn(1000, 2, dtype=torch.float64, generator=g), mixture)
    assert one_mode["modes_covered"] == 1 and one_mode["mode_mass_error"][0] == pytest.approx(0.989 - 0.75, abs=0.02)
