"""The fake score carried from one run to the next (sd/fake_score.py): written, checked against the teacher's
architecture before any work, loaded with or without DMD2's classifier head. No Ray."""
import copy

import pytest
import torch

from dmd_ray.config import DistillConfig
from dmd_ray.sd.architectures import build_demo_architecture, build_tiny_teacher
from dmd_ray.sd.dmd import gan_classifier
from dmd_ray.sd.fake_score import check_fake_score, load_fake_score, read_shapes, save_fake_score
from dmd_ray.sd.teacher import UNetDenoiser
from dmd_ray.typed_config import ConfigError


def fake_score(gan: bool, seed: int = 0, features: str = "bottleneck") -> UNetDenoiser:
    teacher = build_tiny_teacher(seed)
    cfg = DistillConfig(gan_weight=1e-2 if gan else 0.0, gan_features=features)
    return UNetDenoiser(copy.deepcopy(teacher.unet), gan_classifier(cfg, teacher.unet))


def shapes(unet) -> dict:
    return {k: list(v.shape) for k, v in unet.state_dict().items()}


def test_written_then_loaded_gives_the_same_weights(tmp_path):
    path = str(tmp_path / "fake_score.safetensors")
    trained = fake_score(gan=True, seed=1)
    size = save_fake_score(trained.state_dict(), path, torch.float32)
    assert size == (tmp_path / "fake_score.safetensors").stat().st_size
    check_fake_score(path, shapes(trained.unet))  # the teacher's architecture: accepted
    fresh = fake_score(gan=True, seed=0)
    assert load_fake_score(fresh, path) == "UNet and GAN head"
    for (k, a), b in zip(trained.state_dict().items(), fresh.state_dict().values()):
        assert torch.equal(a, b), k


def test_float16_halves_the_file_and_keeps_the_weights_to_its_precision(tmp_path):
    trained = fake_score(gan=False, seed=1)
    full, half = str(tmp_path / "full.safetensors"), str(tmp_path / "half.safetensors")
    assert save_fake_score(trained.state_dict(), half, torch.float16) < 0.51 * save_fake_score(trained.state_dict(), full, torch.float32)
    fresh = fake_score(gan=False)
    load_fake_score(fresh, half)
    for a, b in zip(trained.state_dict().values(), fresh.state_dict().values()):
        torch.testing.assert_close(b, a, rtol=1e-3, atol=1e-3)
    assert read_shapes(half) == {f"unet.{k}": v for k, v in shapes(trained.unet).items()}


def test_a_gan_head_is_optional_on_either_side(tmp_path):
    """A run that adds the GAN term starts a fresh head; one without it ignores the file's head."""
    without, with_head = str(tmp_path / "without.safetensors"), str(tmp_path / "with.safetensors")
    save_fake_score(fake_score(gan=False, seed=1).state_dict(), without, torch.float32)
    save_fake_score(fake_score(gan=True, seed=1).state_dict(), with_head, torch.float32)
    model = fake_score(gan=True)
    head = copy.deepcopy(model.classifier.state_dict())
    assert load_fake_score(model, without) == "UNet"
    assert all(torch.equal(v, model.classifier.state_dict()[k]) for k, v in head.items())
    assert "left out" in load_fake_score(fake_score(gan=False), with_head)


def test_a_head_on_other_features_starts_afresh_and_one_on_the_same_features_loads(tmp_path):
    """The file records which features its head read: a run that moves the head to the decoder's features keeps the
    UNet and starts a fresh head (the shapes differ here, but need not); files written before the choice read the
    bottleneck."""
    old, decoder = str(tmp_path / "old.safetensors"), str(tmp_path / "decoder.safetensors")
    save_fake_score(fake_score(gan=True, seed=1).state_dict(), old, torch.float32)  # no metadata, as before the choice
    trained = fake_score(gan=True, seed=1, features="decoder")
    save_fake_score(trained.state_dict(), decoder, torch.float32, "decoder")
    model = fake_score(gan=True, features="decoder")
    head = copy.deepcopy(model.classifier.state_dict())
    assert load_fake_score(model, old) == "UNet (its GAN head, on bottleneck features, left out: this run's reads decoder)"
    assert all(torch.equal(v, model.classifier.state_dict()[k]) for k, v in head.items())
    assert load_fake_score(model, decoder) == "UNet and GAN head"
    for (k, a), b in zip(trained.state_dict().items(), model.state_dict().values()):
        assert torch.equal(a, b), k
    assert "left out" in load_fake_score(fake_score(gan=True), decoder)


def test_another_architecture_or_a_broken_file_is_refused_before_any_work(tmp_path):
    path = str(tmp_path / "fake_score.safetensors")
    save_fake_score(fake_score(gan=False).state_dict(), path, torch.float16)
    with torch.device("meta"):
        demo = build_demo_architecture().unet
    with pytest.raises(ConfigError, match="holds another UNet than the teacher's: .* of other shapes"):
        check_fake_score(path, shapes(demo))
    (tmp_path / "broken.safetensors").write_bytes(b"not a safetensors file at all")
    with pytest.raises(ConfigError, match="is not a safetensors file"):
        check_fake_score(str(tmp_path / "broken.safetensors"), shapes(demo))
    (tmp_path / "garbage.safetensors").write_bytes((16).to_bytes(8, "little") + b"{not json at all")
    with pytest.raises(ConfigError, match="is not a safetensors file"):
        check_fake_score(str(tmp_path / "garbage.safetensors"), shapes(demo))
    with pytest.raises(ConfigError, match="cannot be read"):
        check_fake_score(str(tmp_path / "missing.safetensors"), shapes(demo))


def test_a_fake_score_for_a_run_without_one_is_refused():
    with pytest.raises(ConfigError, match="init_fake_score is given to a run without a fake score"):
        DistillConfig(init_fake_score="x.safetensors", dm_weight=0.0).check()


def test_the_driver_checks_the_file_against_the_teachers_unet(tmp_path):
    from dmd_ray.distributed.distill_driver import check_initial_fake_score

    path = str(tmp_path / "fake_score.safetensors")
    save_fake_score(fake_score(gan=True).state_dict(), path, torch.float16)
    check_initial_fake_score(DistillConfig(teacher="tiny", init_fake_score=path))
    with pytest.raises(ConfigError, match="holds another UNet"):
        check_initial_fake_score(DistillConfig(teacher="demo", init_fake_score=path))
