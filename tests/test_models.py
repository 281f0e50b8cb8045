"""Teachers: the tiny offline SD, save/load round trips (local folder, S3), and the errors of load_teacher."""
import os
import shutil

import pytest
import torch

from dmd_ray.data import storage
from dmd_ray.method.denoiser import GuidedDenoiser
from dmd_ray.sd.architectures import build_tiny_teacher
from dmd_ray.sd.resolve import TeacherNotFoundError, load_teacher
from dmd_ray.sd.teacher import UNetDenoiser
from dmd_ray.method.schedule import NoiseSchedule

PROMPT = "a small red circle on a blue background"


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    # These networks are far too small to gain from intra-op threads, and on a shared 2-core machine OpenMP
    # threads that contend with other processes slow a UNet forward from ~10 ms to seconds.
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def tiny():
    return build_tiny_teacher()


@pytest.fixture(scope="module")
def saved(tiny, tmp_path_factory):
    path = str(tmp_path_factory.mktemp("saved") / "teacher")
    tiny.save(path)
    return path


@pytest.fixture(scope="module")
def probe(tiny):
    """Fixed inputs, and the tiny teacher's outputs on them, to compare reloaded teachers against."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(4, *tiny.latent_shape(32), generator=g)
    t = torch.tensor([999, 500, 20, 0])
    cond = tiny.encode_prompts([PROMPT, "a green square", "", "a large yellow triangle on the left"])
    with torch.no_grad():
        out = tiny.denoiser()(x, t, cond)
    return x, t, cond, out


def _assert_same_teacher(teacher, tiny, probe):
    x, t, cond, out = probe
    with torch.no_grad():
        assert torch.equal(teacher.denoiser()(x, t, cond), out)
    assert torch.equal(teacher.encode_prompts([PROMPT, ""]), tiny.encode_prompts([PROMPT, ""]))
    assert teacher.prediction_type == tiny.prediction_type
    assert torch.equal(teacher.schedule.alphas_cumprod, tiny.schedule.alphas_cumprod)
    for net in (teacher.text_encoder, teacher.unet, teacher.vae):
        assert not net.training and not any(p.requires_grad for p in net.parameters())


# --------------------------------------------------------------------------------------------- tiny teacher
def test_tiny_teacher_is_deterministic_and_leaves_global_rng_alone(tiny):
    rng = torch.get_rng_state()
    again, other = build_tiny_teacher(seed=0), build_tiny_teacher(seed=1)
    assert torch.equal(torch.get_rng_state(), rng)
    for name in ("text_encoder", "unet", "vae"):
        a, b = getattr(tiny, name).state_dict(), getattr(again, name).state_dict()
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), name
    assert not torch.equal(next(tiny.unet.parameters()), next(other.unet.parameters()))
    for net in (tiny.text_encoder, tiny.unet, tiny.vae):
        assert not net.training and not any(p.requires_grad for p in net.parameters())
    assert tiny.source == "tiny"


def test_tiny_tokenizer_and_text_embeddings(tiny):
    tok = tiny.tokenizer
    ids = tok(PROMPT).input_ids
    assert len(ids) == 10  # <|startoftext|>, one token per word, <|endoftext|>
    assert tok.convert_ids_to_tokens(ids)[1:-1] == [w + "</w>" for w in PROMPT.split()]
    assert ids[0] == tok.bos_token_id and ids[-1] == tok.eos_token_id == tok.pad_token_id
    assert len(tok("A large Hexagon!").input_ids) > 3  # unknown words still encode, byte by byte

    emb = tiny.encode_prompts([PROMPT, "two green squares"])
    assert emb.shape == (2, tok.model_max_length, 32) and not emb.requires_grad
    uncond = tiny.uncond_embedding()
    assert uncond.shape == (1, tok.model_max_length, 32)
    assert tiny.uncond_embedding() is uncond  # cached
    assert torch.equal(uncond, tiny.encode_prompts([""]))
    assert not torch.equal(emb[:1], uncond)


def test_denoiser_latents_and_decode(tiny):
    assert tiny.latent_shape(32) == (4, 8, 8) and tiny.default_resolution == 32 and tiny.vae_scale_factor == 4
    with pytest.raises(ValueError, match="scale factor"):
        tiny.latent_shape(30)

    x = torch.randn(3, *tiny.latent_shape(32))
    cond = tiny.encode_prompts(["a red circle", "a blue square", ""])
    den = tiny.denoiser()
    assert isinstance(den, UNetDenoiser) and den.unet is tiny.unet
    with torch.no_grad():
        out = den(x, torch.tensor([999, 10, 0]), cond)
        assert out.shape == x.shape
        # float timesteps (as ODE samplers pass them) give the same result as integer ones
        assert torch.allclose(den(x, torch.tensor([999.0, 10.0, 0.0]), cond), out)
        guided = GuidedDenoiser(den, guidance_scale=3.0, uncond=tiny.uncond_embedding())
        assert guided(x, torch.tensor([500, 500, 500]), cond).shape == x.shape

    latents = torch.randn(2, 4, 8, 8, requires_grad=True)
    images = tiny.decode(latents)
    assert images.shape == (2, 3, 32, 32)
    images.mean().backward()  # decode is differentiable: regression losses run through it
    assert latents.grad is not None


def test_to_moves_networks_and_denoiser_casts_inputs():
    teacher = build_tiny_teacher()
    assert teacher.to(dtype=torch.float64) is teacher
    assert all(p.dtype == torch.float64 for m in (teacher.text_encoder, teacher.unet, teacher.vae) for p in m.parameters())
    assert teacher.uncond_embedding().dtype == torch.float64
    with torch.no_grad():
        out = teacher.denoiser()(torch.randn(2, 4, 8, 8), torch.tensor([5, 6]), torch.randn(2, 16, 32))
    assert out.dtype == torch.float64
    assert load_teacher("tiny", torch_dtype=torch.float64).unet.dtype == torch.float64


def test_v_prediction_teacher_schedule():
    teacher = build_tiny_teacher(prediction_type="v_prediction")
    assert teacher.prediction_type == "v_prediction"
    sd15 = NoiseSchedule.from_betas()
    assert torch.allclose(teacher.schedule.alphas_cumprod, sd15.alphas_cumprod, atol=1e-6, rtol=0)
    # diffusers' own float32 table agrees as well
    assert torch.allclose(teacher.scheduler.alphas_cumprod.double(), sd15.alphas_cumprod, atol=1e-6, rtol=0)
    with pytest.raises(ValueError, match="prediction_type"):
        build_tiny_teacher(prediction_type="flow")


# --------------------------------------------------------------------------------------------- save / load
def test_save_load_round_trip(tiny, saved, probe):
    weights = sorted(os.path.relpath(os.path.join(r, f), saved) for r, _, fs in os.walk(saved) for f in fs if not f.endswith((".json", ".txt")))
    assert weights == ["text_encoder/model.safetensors", "unet/diffusion_pytorch_model.safetensors", "vae/diffusion_pytorch_model.safetensors"]
    assert os.listdir(os.path.dirname(saved)) == ["teacher"]  # the temporary sibling folder was renamed away

    teacher = load_teacher(saved)
    assert teacher.source == saved
    _assert_same_teacher(teacher, tiny, probe)
    assert teacher.tokenizer(PROMPT).input_ids == tiny.tokenizer(PROMPT).input_ids
    assert teacher.tokenizer.model_max_length == tiny.tokenizer.model_max_length


def test_save_replaces_an_existing_folder(tmp_path):
    path = str(tmp_path / "teacher")
    build_tiny_teacher(seed=1).save(path)
    tiny = build_tiny_teacher(seed=0)
    tiny.save(path)
    assert sorted(os.listdir(tmp_path)) == ["teacher"]
    loaded = load_teacher(path)
    assert torch.equal(next(loaded.unet.parameters()), next(tiny.unet.parameters()))


def test_saved_teacher_runs_in_stable_diffusion_pipeline(saved):
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(saved, low_cpu_mem_usage=False)
    images = pipe(PROMPT, num_inference_steps=2, height=32, width=32, output_type="np").images
    assert images.shape == (1, 32, 32, 3) and (images >= 0).all() and (images <= 1).all()


def _upload(folder: str, uri: str) -> None:
    for root, _, files in os.walk(folder):
        for f in files:
            rel = os.path.relpath(os.path.join(root, f), folder).replace(os.sep, "/")
            with open(os.path.join(root, f), "rb") as fh:
                storage.write_bytes(storage.join(uri, rel), fh.read())


def test_s3_round_trip_and_cache(tiny, saved, probe, s3_bucket, tmp_path):
    uri = f"{s3_bucket}/teacher"
    _upload(saved, uri)
    cache = tmp_path / "cache"
    teacher = load_teacher(uri, cache_dir=str(cache))
    assert teacher.source == uri
    _assert_same_teacher(teacher, tiny, probe)
    [folder] = list(cache.iterdir())
    assert folder.name.startswith("teacher-")
    stat = folder.stat()

    # A second load reads the cached copy: it works with the bucket emptied, and the folder is untouched.
    for key in storage.boto3_client().list_objects_v2(Bucket=s3_bucket[len("s3://") :])["Contents"]:
        storage.boto3_client().delete_object(Bucket=s3_bucket[len("s3://") :], Key=key["Key"])
    again = load_teacher(uri + "/", cache_dir=str(cache))
    _assert_same_teacher(again, tiny, probe)
    assert list(cache.iterdir()) == [folder]
    assert (folder.stat().st_mtime_ns, folder.stat().st_ino) == (stat.st_mtime_ns, stat.st_ino)


# --------------------------------------------------------------------------------------------- errors
def test_missing_local_path(tmp_path):
    for spec in ("./no/such/teacher", str(tmp_path / "missing")):
        with pytest.raises(TeacherNotFoundError, match="no such folder") as e:
            load_teacher(spec)
        assert spec in str(e.value)


@pytest.mark.filterwarnings("ignore:The `local_dir_use_symlinks` argument is deprecated")  # diffusers -> huggingface_hub
def test_unknown_hub_id_offline():
    spec = "nobody-dmd-ray/no-such-teacher"
    with pytest.raises(TeacherNotFoundError) as e:
        load_teacher(spec)
    msg = str(e.value)
    assert spec in msg and "an existing folder, an s3:// URI, nor a Hugging Face hub id" in msg and "tiny" in msg


def test_incomplete_or_pickle_only_folders(saved, tmp_path):
    pickled = tmp_path / "pickled"
    shutil.copytree(saved, pickled)
    os.remove(pickled / "unet" / "diffusion_pytorch_model.safetensors")
    (pickled / "unet" / "diffusion_pytorch_model.bin").write_bytes(b"not loaded")
    with pytest.raises(TeacherNotFoundError, match=r"unet/ holds only pickle weights \(diffusion_pytorch_model.bin\)"):
        load_teacher(str(pickled))

    no_vae = tmp_path / "no_vae"
    shutil.copytree(saved, no_vae)
    shutil.rmtree(no_vae / "vae")
    with pytest.raises(TeacherNotFoundError, match="no vae/ subfolder"):
        load_teacher(str(no_vae))

    with pytest.raises(TeacherNotFoundError, match="is a file"):
        load_teacher(str(pickled / "model_index.json"))


def test_s3_skips_pickles_and_extras(saved, s3_bucket, tmp_path):
    """A raw snapshot (pickle duplicates, README, other pipeline parts) loads; only safetensors weights are fetched."""
    uri = f"{s3_bucket}/snapshot"
    _upload(saved, uri)
    for extra in ("unet/diffusion_pytorch_model.bin", "README.md", "safety_checker/model.safetensors"):
        storage.write_bytes(f"{uri}/{extra}", b"not fetched")
    teacher = load_teacher(uri, cache_dir=str(tmp_path / "cache"))
    (local,) = [p for p in (tmp_path / "cache").iterdir() if not p.name.startswith(".")]
    fetched = {str(p.relative_to(local)) for p in local.rglob("*") if p.is_file()}
    assert "README.md" not in fetched and not any(f.endswith(".bin") or f.startswith("safety_checker") for f in fetched)
    assert teacher.unet.config.in_channels == 4


def test_s3_errors(saved, s3_bucket, tmp_path):
    uri = f"{s3_bucket}/pickled"
    _upload(saved, uri)
    for name in storage.list_files(f"{uri}/unet"):
        if name.endswith(".safetensors"):
            storage.delete_file(f"{uri}/unet/{name}")
    storage.write_bytes(f"{uri}/unet/diffusion_pytorch_model.bin", b"not loaded")
    cache = tmp_path / "cache"
    with pytest.raises(TeacherNotFoundError, match=r"unet/ holds no .safetensors weights"):
        load_teacher(uri, cache_dir=str(cache))

    with pytest.raises(TeacherNotFoundError, match="nothing to download"):
        load_teacher(f"{s3_bucket}/no-such-prefix", cache_dir=str(cache))
    with pytest.raises((TeacherNotFoundError, storage.StorageError)):
        load_teacher("s3://dmd-ray-no-such-bucket/teacher", cache_dir=str(cache))
