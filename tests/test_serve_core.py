"""The service's Ray-free parts: config, finding a generator, request validation, batched generation.

The generator is a fixture export of the tiny teacher (random weights, 32x32 images): it tests plumbing, not quality.
"""
import os
import warnings

import numpy as np
import pytest
import torch
import yaml

from dmd_ray.images import png_bytes
from dmd_ray.sd import resolve
from dmd_ray.sd.architectures import build_tiny_teacher
from dmd_ray.sd.one_step import GenerationJob, ImageSize, OneStepImageGenerator
from serve.requests import RequestError, RequestLimits, validate_generation

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def export_tiny_generator(folder) -> str:
    from dmd_ray.sd.export import export_generator

    teacher = build_tiny_teacher()
    with warnings.catch_warnings():  # diffusers calls the one-step scheduler's steps_offset=0 outdated; it is meant
        warnings.filterwarnings("ignore", "The configuration file of this scheduler", FutureWarning)
        return export_generator(teacher, teacher.unet, str(folder), timestep=teacher.scheduler.config.num_train_timesteps - 1)


@pytest.fixture(scope="module")
def generator_folder(tmp_path_factory):
    return export_tiny_generator(tmp_path_factory.mktemp("serve") / "tiny-generator")


@pytest.fixture(scope="module")
def generator(generator_folder):
    return OneStepImageGenerator(generator_folder)


# --------------------------------------------------------------------------------------------- config
def test_config_coerces_command_line_strings_and_rejects_unknown_keys():
    from serve.config import ServiceConfig

    config = ServiceConfig.from_args({"max_batch_size": "4", "batch_wait_timeout_s": "0.01", "warmup": "false",
                                      "sizes": "64x64, 32x32", "autoscaling_config": '{"max_replicas": 3}'})
    assert (config.max_batch_size, config.batch_wait_timeout_s, config.warmup) == (4, 0.01, False)
    assert config.sizes == ("64x64", "32x32")
    assert config.autoscaling_config["max_replicas"] == 3 and config.autoscaling_config["min_replicas"] == 1
    with pytest.raises(ValueError, match=r"unknown config key\(s\) \['max_batchsize'\] for ServiceConfig; valid keys: \[.*'model'"):
        ServiceConfig.from_args({"max_batchsize": 4})
    with pytest.raises(ValueError, match="max_ongoing_requests .* must be >= max_batch_size"):
        ServiceConfig.from_args({"max_batch_size": 8, "max_ongoing_requests": 4})
    with pytest.raises(ValueError, match="max_images .* must be <= max_batch_size"):
        ServiceConfig.from_args({"max_batch_size": 2, "max_images": 4})
    with pytest.raises(ValueError, match="unknown autoscaling_config key"):
        ServiceConfig.from_args({"autoscaling_config": {"max_replica": 2}})
    with pytest.raises(ValueError, match="autoscaling_config"):
        ServiceConfig.from_args({"autoscaling_config": {"min_replicas": 3, "max_replicas": 2}})
    with pytest.raises(ValueError, match=r"inline_response_kib must be in \[0, 8192\]"):
        ServiceConfig.from_args({"inline_response_kib": 16384})
    with pytest.raises(ValueError, match="expects an integer"):
        ServiceConfig.from_args({"max_images": 2.5})
    with pytest.raises(ValueError, match="not of the form WIDTHxHEIGHT"):
        ServiceConfig.from_args({"sizes": ["big"]})


def test_replicas_send_responses_up_to_the_configured_size_inline(monkeypatch):
    # Ray's core worker in the replica reads RAY_max_direct_call_object_size at start: responses up to it travel in
    # the RPC message to the proxy instead of through the object store; 0 leaves Ray's own limit alone.
    from serve.app import build_deployment
    from serve.config import ServiceConfig

    monkeypatch.setattr("serve.app.cluster_has_gpus", lambda: False)
    options = build_deployment(ServiceConfig.from_args({"inline_response_kib": 2048})).ray_actor_options
    assert options["runtime_env"] == {"env_vars": {"RAY_max_direct_call_object_size": str(2048 * 1024)}}
    assert "runtime_env" not in build_deployment(ServiceConfig.from_args({"inline_response_kib": 0})).ray_actor_options


def test_config_yaml_is_a_valid_serve_config_with_the_documented_defaults():
    from ray.serve.schema import ServeDeploySchema

    from serve.config import ServiceConfig

    with open(os.path.join(REPO, "serve", "config.yaml")) as f:
        raw = yaml.safe_load(f)
    ServeDeploySchema.model_validate(raw)
    (application,) = raw["applications"]
    assert application["import_path"] == "serve.app:build_app"
    assert ServiceConfig.from_args(application["args"]) == ServiceConfig()  # the YAML spells out every default


def test_build_app_fails_fast_on_an_unknown_generator_name(monkeypatch):
    from serve.app import build_app

    monkeypatch.setattr(resolve, "BUILT_IN_GENERATORS", {"demo": "/nowhere"})
    with pytest.raises(resolve.GeneratorNotFoundError, match=r"'no-such-model'.*built-in: demo"):
        build_app({"model": "no-such-model"})
    with pytest.raises(ValueError, match="unknown config key"):
        build_app({"model": "demo", "modle": "x"})
    monkeypatch.undo()
    with pytest.raises(resolve.ConfigError, match="demo-4step holds a 4-step generator.*num_inference_steps=4"):
        build_app({"model": "demo-4step"})  # the packaged four-step student: diffusers runs it, this service does not


# --------------------------------------------------------------------------------------------- finding a generator
def test_resolve_generator_from_a_folder_a_built_in_name_and_s3(generator_folder, s3_bucket, tmp_path, monkeypatch):
    assert resolve.resolve_generator(generator_folder) == generator_folder

    monkeypatch.setattr(resolve, "BUILT_IN_GENERATORS", {})
    with pytest.raises(resolve.GeneratorNotFoundError, match="none are registered yet"):
        resolve.resolve_generator("demo")
    monkeypatch.setattr(resolve, "BUILT_IN_GENERATORS", {"demo": generator_folder})
    assert resolve.resolve_generator("demo") == generator_folder

    teacher_folder = tmp_path / "teacher"  # a plain (multi-step) teacher folder is not a generator
    build_tiny_teacher().save(str(teacher_folder))
    with pytest.raises(resolve.GeneratorNotFoundError, match="no dmd_ray.json"):
        resolve.resolve_generator(str(teacher_folder))

    from dmd_ray.data.storage import boto3_client

    client = boto3_client()
    bucket = s3_bucket[len("s3://"):]
    for root, _, files in os.walk(generator_folder):
        for name in files:
            relative = os.path.relpath(os.path.join(root, name), generator_folder)
            client.upload_file(os.path.join(root, name), bucket, f"generators/tiny/{relative}")
    folder = resolve.resolve_generator(f"{s3_bucket}/generators/tiny", cache_dir=str(tmp_path / "cache"))
    assert folder.startswith(str(tmp_path / "cache"))
    assert resolve.read_generator_info(folder) == resolve.read_generator_info(generator_folder)
    with pytest.raises(resolve.GeneratorNotFoundError):
        resolve.resolve_generator(f"{s3_bucket}/generators/missing", cache_dir=str(tmp_path / "cache"))


# --------------------------------------------------------------------------------------------- requests
LIMITS = RequestLimits(max_prompt_chars=20, max_images=3, sizes=(ImageSize(32, 32), ImageSize(64, 64)))


def test_validate_generation_accepts_good_requests():
    job = validate_generation("a red circle", 2, "64x64", 7, LIMITS)
    assert job == GenerationJob("a red circle", (7, 8), ImageSize(64, 64))
    assert validate_generation("x", 1, None, None, LIMITS).size == ImageSize(32, 32)
    assert validate_generation("x", 1, "auto", 0, LIMITS).size == ImageSize(32, 32)
    assert validate_generation("x", 2, None, 2**32 - 1, LIMITS).seeds == (2**32 - 1, 0)  # seeds wrap


@pytest.mark.parametrize(
    "prompt, n, size, seed, param",
    [
        (None, 1, None, 0, "prompt"),
        ("   ", 1, None, 0, "prompt"),
        ("x" * 21, 1, None, 0, "prompt"),
        ("x", 0, None, 0, "n"),
        ("x", 4, None, 0, "n"),
        ("x", True, None, 0, "n"),
        ("x", 1, "48x48", 0, "size"),
        ("x", 1, "32 by 32", 0, "size"),
        ("x", 1, 32, 0, "size"),
        ("x", 1, None, -1, "seed"),
        ("x", 1, None, 2**32, "seed"),
    ],
)
def test_validate_generation_names_the_bad_parameter(prompt, n, size, seed, param):
    with pytest.raises(RequestError) as caught:
        validate_generation(prompt, n, size, seed, LIMITS)
    assert caught.value.status == 400 and caught.value.param == param
    error = caught.value.to_json()["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["type"] == "invalid_request_error"


# --------------------------------------------------------------------------------------------- generation
@pytest.mark.filterwarnings("ignore:The configuration file of this scheduler:FutureWarning")  # as in export_tiny_generator
def test_generator_matches_the_exported_pipeline(generator, generator_folder):
    """The direct component path gives the diffusers pipeline's images for the same seed (up to one level of 255:
    x0 is read out in float64 here, float32 in the DDIM step)."""
    from diffusers import DiffusionPipeline

    pipe = DiffusionPipeline.from_pretrained(generator_folder)
    pipe.set_progress_bar_config(disable=True)
    prompts, seeds = ["a small red circle", "a large blue square"], [3, 11]
    expected = pipe(prompts, num_inference_steps=1, guidance_scale=1.0, output_type="np",
                    generator=[torch.Generator().manual_seed(s) for s in seeds]).images
    expected = (expected * 255).round().astype(np.uint8)
    images = generator.generate([GenerationJob(p, (s,), generator.native_size) for p, s in zip(prompts, seeds)])
    got = np.concatenate(images)
    assert got.shape == expected.shape == (2, 32, 32, 3)
    difference = np.abs(got.astype(int) - expected.astype(int))
    assert difference.max() <= 2 and difference.mean() < 0.1
    assert np.abs(got[0].astype(int) - got[1].astype(int)).mean() > 5  # different prompts and seeds: different images


def test_generation_is_deterministic_per_seed_whatever_the_batch(generator):
    size = generator.native_size
    alone = generator.generate([GenerationJob("a green star", (5,), size)])[0]
    again = generator.generate([GenerationJob("a green star", (5,), size)])[0]
    assert np.array_equal(alone, again)
    other = generator.generate([GenerationJob("a green star", (6,), size)])[0]
    assert np.abs(other.astype(int) - alone.astype(int)).mean() > 1  # another seed, another image
    # n images with seed s are the images of seeds s, s+1, ...; other requests in the batch change nothing
    batch = generator.generate([GenerationJob("a red ring", (1,), size), GenerationJob("a green star", (4, 5), size),
                                GenerationJob("a red ring", (9,), ImageSize(64, 64))])
    assert [b.shape for b in batch] == [(1, 32, 32, 3), (2, 32, 32, 3), (1, 64, 64, 3)]
    assert np.abs(batch[1][1:].astype(int) - alone.astype(int)).max() <= 1
    assert not np.array_equal(batch[1][0], batch[1][1])


def test_generator_rejects_sizes_its_unet_cannot_take(generator):
    assert generator.size_multiple == 8
    generator.check_size(ImageSize(48, 64))
    with pytest.raises(ValueError, match="multiples of 8"):
        generator.check_size(ImageSize(36, 36))


def test_png_bytes_round_trip(generator):
    from PIL import Image
    import io

    image = generator.generate([GenerationJob("a dot", (0,), generator.native_size)])[0][0]
    decoded = np.asarray(Image.open(io.BytesIO(png_bytes(image))))
    assert np.array_equal(decoded, image)


def test_output_formats_round_trip_and_encode_in_parallel_in_order(generator):
    """PNG is lossless, JPEG and WebP close at high quality; the service's encoder keeps the images' order, from a
    uint8 array (CPU replicas) or an NCHW uint8 tensor (what a GPU replica's generator hands over)."""
    import asyncio
    import io

    from PIL import Image

    from dmd_ray.images import encode_image
    from serve.app import ImageEncoder

    size = generator.native_size
    jobs = [GenerationJob("a dot", (0, 1, 2), size), GenerationJob("a red ring", (3,), size)]
    images = np.concatenate(generator.generate(jobs))
    on_device = generator.generate(jobs, on_device=True)
    assert all(isinstance(t, torch.Tensor) and t.dtype == torch.uint8 for t in on_device)
    assert np.array_equal(torch.cat(on_device).permute(0, 2, 3, 1).numpy(), images)
    for output_format, tolerance in (("png", 0), ("jpeg", 16), ("webp", 16)):
        decoded = np.asarray(Image.open(io.BytesIO(encode_image(images[0], output_format, quality=95))).convert("RGB"))
        assert decoded.shape == images[0].shape and np.abs(decoded.astype(int) - images[0].astype(int)).mean() <= tolerance, output_format
    encoder = ImageEncoder(threads=3)
    for batch in (images, torch.cat(on_device)):
        encoded = asyncio.run(encoder.encode(batch, "jpeg", 90))
        assert encoded == [encode_image(image, "jpeg", 90) for image in images]  # in order, as encoded one by one
    with pytest.raises(ValueError, match="not one of png, jpeg, webp"):
        encode_image(images[0], "gif")


def test_requests_name_a_bad_output_format_or_compression():
    from pydantic import ValidationError

    from serve.app import GenerateRequest, ImageGenerationRequest

    assert ImageGenerationRequest(prompt="x").output_format == "png"
    assert ImageGenerationRequest(prompt="x", output_format="webp", output_compression=0).output_compression == 0
    for bad in (dict(output_format="gif"), dict(output_compression=101), dict(output_compression=-1)):
        with pytest.raises(ValidationError, match=next(iter(bad))):
            ImageGenerationRequest(prompt="x", **bad)
        with pytest.raises(ValidationError, match=next(iter(bad))):
            GenerateRequest(prompt="x", **bad)


# --------------------------------------------------------------------------------------------- the tiny decoder
def test_tiny_decoder_loads_from_its_name_a_folder_s3_and_refuses_what_cannot_decode(s3_bucket, tmp_path, monkeypatch):
    """resolve.load_tiny_decoder: the packaged demo-tiny, a folder, an s3:// prefix; a hub id that cannot be fetched
    and a decoder of other latents are refused by name."""
    from huggingface_hub import constants

    from dmd_ray.data.storage import upload_tree
    from dmd_ray.demos.tiny_decoder import build_tiny_decoder

    packaged = resolve.load_tiny_decoder("demo-tiny")
    assert not any(p.requires_grad for p in packaged.parameters())
    resolve.check_tiny_decoder(packaged, 4, 4, "demo-tiny")
    folder = str(tmp_path / "taesd-like")
    build_tiny_decoder(4, 8).save_pretrained(folder, safe_serialization=True)  # SD's layout: three upsamplings
    local = resolve.load_tiny_decoder(folder)
    assert local.decode(torch.randn(1, 4, 8, 8), return_dict=False)[0].shape == (1, 3, 64, 64)
    with pytest.raises(resolve.ConfigError, match="upsampled 8x; this model's are 4-channel, upsampled 4x"):
        resolve.check_tiny_decoder(local, 4, 4, folder)
    upload_tree(folder, f"{s3_bucket}/decoders/taesd-like")
    from_s3 = resolve.load_tiny_decoder(f"{s3_bucket}/decoders/taesd-like", cache_dir=str(tmp_path / "cache"))
    assert all(torch.equal(a, b) for a, b in zip(from_s3.state_dict().values(), local.state_dict().values()))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(resolve.DecoderNotFoundError, match="madebyollin/taesd.*HF_HUB_OFFLINE"):
        resolve.load_tiny_decoder("madebyollin/taesd")
    with pytest.raises(resolve.DecoderNotFoundError, match="no such folder"):
        resolve.load_tiny_decoder(str(tmp_path / "missing"))


def test_the_demo_generator_decodes_with_the_tiny_decoder_close_to_its_vae():
    size = ImageSize(32, 32)
    jobs = [GenerationJob("a large red circle on a blue background", (0, 1, 2, 3), size)]
    full = OneStepImageGenerator(resolve.BUILT_IN_GENERATORS["demo"])
    tiny = OneStepImageGenerator(resolve.BUILT_IN_GENERATORS["demo"], decoder="demo-tiny")
    a, b = full.generate(jobs)[0].astype(float), tiny.generate(jobs)[0].astype(float)
    assert a.shape == b.shape == (4, 32, 32, 3)
    assert np.abs(a - b).mean() < 12  # pixel levels of 255 (BENCHMARKS.md has the judge's FID and accuracy)


def test_the_tuned_generator_gives_the_same_images():
    """`tuned` (channels-last weights, fused attention projections) changes the memory layout, not the maths: the
    built-in demo generator gives the same images within a pixel level, and the tuning really took place."""
    jobs = [GenerationJob("a red ring", (1, 2), ImageSize(32, 32)), GenerationJob("a blue square", (3,), ImageSize(32, 32))]
    plain = OneStepImageGenerator(resolve.BUILT_IN_GENERATORS["demo"])
    tuned = OneStepImageGenerator(resolve.BUILT_IN_GENERATORS["demo"], tuned=True)
    unet = tuned.components.unet
    assert unet.conv_in.weight.is_contiguous(memory_format=torch.channels_last)
    fused = [m for m in unet.modules() if hasattr(m, "to_qkv") or hasattr(m, "to_kv")]
    assert fused and all(getattr(m, "fused_projections", False) for m in fused)
    a, b = (np.concatenate(g.generate(jobs)).astype(int) for g in (plain, tuned))
    assert a.shape == b.shape == (3, 32, 32, 3) and np.abs(a - b).max() <= 1


@pytest.mark.slow
def test_the_compiled_generator_gives_the_eager_images():
    """compile_mode (the service's `compile`, reduce-overhead on GPUs) only changes speed: compiled in the default
    mode on CPU, the same jobs give the eager images within a pixel level, with the full VAE and the tiny decoder;
    a batch of 3 runs padded to the 4-image graph and comes back as 3 images; the warm-up compiled every graph the
    jobs need (the text encoder's for 2 distinct prompts too), so a request compiles nothing, and it compiled each
    network twice (batch 1, then any batch), not once per bucket (1, 2 and 4). After the warm-up a request checks only
    the guards that tell the graphs apart (skip_guards), unless it brings a size or batch the warm-up did not compile."""
    from torch._dynamo.utils import counters

    from dmd_ray.sd.one_step import batch_bucket

    assert [batch_bucket(n) for n in (1, 2, 3, 4, 5, 8, 9)] == [1, 2, 4, 4, 8, 8, 16]
    size = ImageSize(32, 32)
    jobs = [GenerationJob("a red ring", (1, 2), size), GenerationJob("a blue square", (3,), size)]
    for decoder in ("", "demo-tiny"):
        eager = OneStepImageGenerator(resolve.BUILT_IN_GENERATORS["demo"], decoder=decoder)
        compiled = OneStepImageGenerator(resolve.BUILT_IN_GENERATORS["demo"], decoder=decoder, compile_mode="default")
        before = counters["stats"]["unique_graphs"]
        compiled.warmup(3, [size])
        graphs = counters["stats"]["unique_graphs"]
        # (at most: the second generator shares the first one's text encoder and UNet graphs, same code and shapes)
        assert graphs - before <= 2 * 3, f"{decoder}: {graphs - before} graphs for the text encoder, UNet and decoder"
        a, b = (np.concatenate(g.generate(jobs)).astype(int) for g in (eager, compiled))
        assert graphs > 0 and counters["stats"]["unique_graphs"] == graphs, decoder
        assert a.shape == b.shape == (3, 32, 32, 3)
        assert np.abs(a - b).max() <= 1, decoder
        assert compiled.latents(jobs).shape[0] == 3
        # skip_guards: warmed jobs check only the differentiating guards; a size or batch the warm-up did not compile
        # checks them all (torch's private stance: no public getter)
        stance = torch._dynamo.eval_frame
        for checked_jobs, skipped in ((jobs, True), ([GenerationJob("a", (1,), ImageSize(64, 64))], False), (jobs * 2, False)):
            with compiled._guards(checked_jobs):
                assert stance._stance.skip_guard_eval_unsafe is skipped, (decoder, checked_jobs)
        assert not stance._stance.skip_guard_eval_unsafe


def test_the_batcher_waits_for_a_batch_to_fill_only_under_load(generator, monkeypatch):
    # A lone client's request runs at once (no batch wait after a batch of one image); once a batch held several
    # images, the next one waits the configured time to gather the clients that were answered together.
    import asyncio
    import types

    from ray import serve

    from serve.app import BatchedGenerator

    context = types.SimpleNamespace(_deployment_config=types.SimpleNamespace(max_ongoing_requests=8))
    monkeypatch.setattr(serve, "get_replica_context", lambda: context)  # outside a replica, as the benchmark runs it

    async def scenario() -> list[float]:  # the waits as Serve holds them (its getter is private)
        batcher = BatchedGenerator(generator, max_batch_size=4, batch_wait_timeout_s=0.05)
        waits = [batcher._gather._get_batch_wait_timeout_s()]
        await batcher.generate(GenerationJob("alone", (1,), generator.native_size))
        waits.append(batcher._gather._get_batch_wait_timeout_s())
        images = await asyncio.gather(*(batcher.generate(GenerationJob(f"together {i}", (i,), generator.native_size)) for i in range(3)))
        assert [len(i) for i in images] == [1, 1, 1] and batcher.batches_run == 2  # the three shared one batch
        waits.append(batcher._gather._get_batch_wait_timeout_s())
        return waits

    assert asyncio.run(scenario()) == [0.05, 0.0, 0.05]


@pytest.mark.parametrize("bound, waited_for", [(0, []), (1, [0, 1, 2, 3]), (2, [0, 1, 2]), (3, [0, 1])])
def test_the_generator_thread_keeps_at_most_the_bound_of_batches_queued_on_the_gpu(bound, waited_for, monkeypatch):
    # After queuing a batch the generator thread waits for the GPU to draw earlier ones until fewer than the bound are
    # left queued, so that the next batch it takes has filled meanwhile. Events stand in for the GPU's: each records
    # whether the thread waited for it.
    import types

    from ray import serve

    from serve.app import BatchedGenerator

    class Event:
        def __init__(self):
            self.waited = False
            events.append(self)

        def record(self):
            pass

        def synchronize(self):
            self.waited = True

    events: list[Event] = []
    monkeypatch.setattr(torch.cuda, "Event", Event)
    context = types.SimpleNamespace(_deployment_config=types.SimpleNamespace(max_ongoing_requests=8))
    monkeypatch.setattr(serve, "get_replica_context", lambda: context)
    gpu = types.SimpleNamespace(device=torch.device("cpu"), generate=lambda jobs, on_device: [torch.zeros(1, 3, 2, 2) for _ in jobs])
    batcher = BatchedGenerator(gpu, max_batch_size=2, batch_wait_timeout_s=0.0, on_device=True, max_batches_in_flight=bound)
    for seed in range(4):
        [images] = batcher._generate_batch([GenerationJob("a red circle", (seed,), ImageSize(2, 2))])
        assert images.ready is events[-1]
    assert [i for i, event in enumerate(events) if event.waited] == waited_for


@pytest.mark.skipif(not torch.cuda.is_available(), reason="the generator's CUDA stream and nvJPEG need a GPU")
def test_gpu_images_are_encoded_only_once_the_generator_has_drawn_them(monkeypatch):
    # The generator thread hands a batch's images over before the GPU has drawn them and goes on to queue the next
    # batch, on a stream of its own. A spin kernel queued before every batch holds the GPU for ~20 ms, so an encoder
    # that did not wait for the images (nvJPEG runs on torchvision's stream) would read unfinished ones, or an
    # earlier batch's left in the same memory. One batcher for both formats: Serve's batch queue is per process.
    import asyncio
    import io
    import types

    from PIL import Image
    from ray import serve

    from serve.app import BatchedGenerator, ImageEncoder

    context = types.SimpleNamespace(_deployment_config=types.SimpleNamespace(max_ongoing_requests=8))
    monkeypatch.setattr(serve, "get_replica_context", lambda: context)
    gpu = OneStepImageGenerator(resolve.resolve_generator("demo"), "cuda")
    size, seeds = gpu.native_size, range(8)
    expected = {seed: gpu.generate([GenerationJob(f"a red circle {seed}", (seed,), size)])[0][0].astype(int) for seed in seeds}
    generate = gpu.generate

    def slow_generate(jobs, on_device=False):
        torch.cuda._sleep(40_000_000)  # on the calling thread's current stream, ahead of the batch
        return generate(jobs, on_device)

    monkeypatch.setattr(gpu, "generate", slow_generate)
    batcher = BatchedGenerator(gpu, max_batch_size=2, batch_wait_timeout_s=0.001, on_device=True, max_batches_in_flight=2)
    encoder = ImageEncoder(threads=2)

    async def request(seed: int, output_format: str) -> float:
        images = await batcher.generate(GenerationJob(f"a red circle {seed}", (seed,), size))
        data = (await encoder.encode(images, output_format, 95))[0]
        return np.abs(np.asarray(Image.open(io.BytesIO(data)).convert("RGB")).astype(int) - expected[seed]).mean()

    async def requests() -> dict:
        formats = ("jpeg", "png")
        errors = await asyncio.gather(*(request(seed, f) for f in formats for seed in seeds))
        return {f: errors[i * len(seeds):(i + 1) * len(seeds)] for i, f in enumerate(formats)}

    errors = asyncio.run(requests())  # mean absolute error per image, 0-255 (another seed's image: tens)
    # PNG is lossless, but the reference ran at batch 1 and the requests at batch 2: convolutions may pick other
    # kernels, a few pixels then differ by one step
    assert max(errors["jpeg"]) <= 6 and max(errors["png"]) <= 0.1, errors


def test_server_timing_names_each_phase_and_the_handlers_whole_time(monkeypatch):
    from serve.app import ServerTiming

    clock = iter([10.0, 10.25, 10.2625])  # the handler's start, then the end of each phase
    monkeypatch.setattr("serve.app.time.perf_counter", lambda: next(clock))
    timing = ServerTiming(next(clock))
    timing.mark("generate")
    timing.mark("encode")
    header = timing.header()
    assert header == "generate;dur=250.0, encode;dur=12.5, handler;dur=262.5"
    assert ServerTiming.parse(header) == {"generate": 250.0, "encode": 12.5, "handler": 262.5}
    assert ServerTiming.parse('cache;desc="hit", db;dur=3, total;desc="x";dur=7.5') == {"db": 3.0, "total": 7.5}
