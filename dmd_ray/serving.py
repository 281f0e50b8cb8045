"""Serving an exported one-step generator, without Ray: finding it, validating requests, generating in batches.

`serve/` wraps this in Ray Serve (HTTP, batching across requests, replicas); the benchmark runs the same code bare.

- `resolve_generator(spec)`: a built-in name (models.BUILT_IN_GENERATORS), an s3:// prefix or a local folder ->
  the local folder of an exported generator (see export.py).
- `validate_generation(...)`: the user's prompt, n, size and seed -> a `GenerationJob`, or a `RequestError` that
  says which parameter is wrong (the HTTP layer turns it into a 4xx in OpenAI's error format).
- `OneStepImageGenerator.generate(jobs)`: many jobs in one forward pass of tokenizer -> text encoder -> UNet at
  the generator's timestep -> x0 -> VAE decode. This is what the exported pipeline computes with
  num_inference_steps=1 and guidance_scale=1.0, minus its per-call overhead, and with one seed per image.

Determinism: image i of a request with seed s is drawn from noise seeded s + i (mod 2**32), generated on the CPU
in float32 whatever the device, so a seed means the same noise everywhere, and `n` images are the same images as
`n` single requests with consecutive seeds. The networks' arithmetic may still differ in the last bits between
batch compositions and devices (different kernels), which can move a pixel by one level of 255.
"""
from __future__ import annotations

import io
import json
import os
import re
import secrets
from dataclasses import dataclass
from typing import Sequence

import numpy as np
import torch

from dmd_ray import models, storage
from dmd_ray.generator import OneStepGenerator
from dmd_ray.images import to_uint8

SEED_MODULUS = 2**32  # seeds are uint32: exact in a browser's JSON numbers (up to 2**53), easy to type and share
GENERATOR_FORMAT = "dmd-ray-generator/1"


# --------------------------------------------------------------------------------------------- finding a generator
class GeneratorNotFoundError(ValueError):
    """A generator spec that names nothing servable; the message says what was tried and what exists."""


def _not_found_message(spec: str, folder: str) -> str:
    built_in = ", ".join(sorted(models.BUILT_IN_GENERATORS)) or "none are registered yet"
    return (f"generator {spec!r} is neither a built-in name (built-in: {built_in}), an s3:// URI, nor an existing "
            f"folder ({os.path.abspath(folder)} does not exist)")


def _local_folder(spec: str) -> str:
    return os.path.expanduser(spec[len("file://") :] if spec.startswith("file://") else spec)


def check_generator_spec(spec: str) -> None:
    """Fails fast, without loading anything, on a spec that can only have meant a built-in name and is not one.
    Paths are left to the replicas: on a cluster, a folder may exist on the workers only."""
    if spec in models.BUILT_IN_GENERATORS or storage.is_s3(spec) or "/" in spec or os.sep in spec:
        return
    if not os.path.isdir(_local_folder(spec)):
        raise GeneratorNotFoundError(_not_found_message(spec, _local_folder(spec)))


def default_cache_dir() -> str:
    return os.path.join(os.path.expanduser("~"), ".cache", "dmd_ray", "generators")


def _wanted_from_s3(relative_path: str) -> bool:
    """A teacher's files (safetensors weights, configs, tokenizer; no pickles) plus the generator's metadata."""
    return relative_path == "dmd_ray.json" or models._wanted_from_s3(relative_path)


def _download_generator(uri: str, cache_dir: str | None) -> str:
    """Downloads an s3:// generator once (prefixes are treated as immutable, as for teachers), into a cache of its
    own: a teacher cached from the same prefix lacks dmd_ray.json."""
    uri = "s3://" + uri[len("s3://") :].strip("/")
    local = models._s3_cache_folder(uri, os.path.expanduser(cache_dir or default_cache_dir()))
    try:
        return storage.download_prefix(uri, local, _wanted_from_s3)
    except storage.StorageError as e:  # nothing (usable) under the prefix
        raise GeneratorNotFoundError(f"generator {uri!r}: {e}") from e
    except OSError as e:  # pyarrow: missing bucket, access denied, unreachable endpoint
        raise storage.StorageError(f"cannot download generator {uri!r}: {models._brief(e)}") from e


def resolve_generator(spec: str, cache_dir: str | None = None) -> str:
    """The local folder of the exported generator named by `spec`: a built-in name, an s3:// prefix (downloaded
    once into `cache_dir`, safetensors and configs only) or a local folder."""
    spec = str(spec)
    if spec in models.BUILT_IN_GENERATORS:
        folder = models.BUILT_IN_GENERATORS[spec]
    elif storage.is_s3(spec):
        folder = _download_generator(spec, cache_dir)
    else:
        folder = _local_folder(spec)
        if not os.path.isdir(folder):
            raise GeneratorNotFoundError(_not_found_message(spec, folder))
    info_path = os.path.join(folder, "dmd_ray.json")
    if not os.path.isfile(info_path):
        raise GeneratorNotFoundError(
            f"generator {spec!r}: {folder} has no dmd_ray.json, so it is not an exported one-step generator "
            "(dmd_ray.export.export_generator writes one); a multi-step teacher would give noise in one step"
        )
    return folder


def read_generator_info(folder: str) -> dict:
    with open(os.path.join(folder, "dmd_ray.json")) as f:
        info = json.load(f)
    if info.get("format") != GENERATOR_FORMAT:
        raise GeneratorNotFoundError(f"{folder}/dmd_ray.json has format {info.get('format')!r}; expected {GENERATOR_FORMAT!r}")
    return info


# --------------------------------------------------------------------------------------------- requests
@dataclass(frozen=True, order=True)
class ImageSize:
    width: int
    height: int

    _PATTERN = re.compile(r"^([1-9][0-9]{0,4})x([1-9][0-9]{0,4})$")

    @classmethod
    def parse(cls, text: str) -> "ImageSize":
        match = cls._PATTERN.match(str(text).strip())
        if not match:
            raise ValueError(f"size {text!r} is not of the form WIDTHxHEIGHT, e.g. 512x512")
        return cls(int(match[1]), int(match[2]))

    def __str__(self) -> str:
        return f"{self.width}x{self.height}"


@dataclass(frozen=True)
class RequestLimits:
    """What one request may ask for. `sizes[0]` is the default size."""

    max_prompt_chars: int
    max_images: int
    sizes: tuple[ImageSize, ...]

    @property
    def default_size(self) -> ImageSize:
        return self.sizes[0]


class RequestError(ValueError):
    """A request the service refuses, in the shape of OpenAI's error object: HTTP status, message, the parameter
    at fault and a machine-readable code."""

    def __init__(self, message: str, param: str | None = None, status: int = 400, code: str | None = None,
                 error_type: str = "invalid_request_error"):
        super().__init__(message)
        self.message, self.param, self.status, self.code, self.error_type = message, param, status, code, error_type

    def to_json(self) -> dict:
        return openai_error(self.message, self.error_type, self.param, self.code)


def openai_error(message: str, error_type: str = "invalid_request_error", param: str | None = None, code: str | None = None) -> dict:
    """OpenAI's error body: {"error": {"message", "type", "param", "code"}}."""
    return {"error": {"message": message, "type": error_type, "param": param, "code": code}}


@dataclass(frozen=True)
class GenerationJob:
    """One request's images: the same prompt and size, one seed per image."""

    prompt: str
    seeds: tuple[int, ...]
    size: ImageSize

    @property
    def num_images(self) -> int:
        return len(self.seeds)


def random_seed() -> int:
    return secrets.randbelow(SEED_MODULUS)


def validate_generation(prompt: object, n: object, size: object, seed: object, limits: RequestLimits) -> GenerationJob:
    """A GenerationJob from untrusted values, or a RequestError naming the parameter at fault. `size` and `seed`
    may be None (the default size; a random seed); "auto" means the default size, as in OpenAI's API."""
    if not isinstance(prompt, str):
        raise RequestError("'prompt' must be a string", "prompt")
    if not prompt.strip():
        raise RequestError("'prompt' must not be empty", "prompt")
    if len(prompt) > limits.max_prompt_chars:
        raise RequestError(f"'prompt' is {len(prompt)} characters long; the limit is {limits.max_prompt_chars}", "prompt", code="string_above_max_length")
    if isinstance(n, bool) or not isinstance(n, int):
        raise RequestError("'n' must be an integer", "n")
    if not 1 <= n <= limits.max_images:
        raise RequestError(f"'n' is {n}; it must be between 1 and {limits.max_images}", "n", code="integer_out_of_range")
    allowed = ", ".join(map(str, limits.sizes))
    if size is None or size == "auto":
        image_size = limits.default_size
    else:
        try:
            image_size = ImageSize.parse(size) if isinstance(size, str) else None
        except ValueError:
            image_size = None
        if image_size not in limits.sizes:
            raise RequestError(f"'size' {size!r} is not supported; supported sizes: {allowed}", "size", code="unsupported_size")
    if seed is None:
        seed = random_seed()
    elif isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed < SEED_MODULUS:
        raise RequestError(f"'seed' must be an integer in [0, {SEED_MODULUS - 1}]", "seed")
    return GenerationJob(prompt, tuple((seed + i) % SEED_MODULUS for i in range(n)), image_size)


# --------------------------------------------------------------------------------------------- generation
def seeded_noise(seed: int, shape: Sequence[int]) -> torch.Tensor:
    """[1, *shape] standard normal noise from a CPU generator in float32: the same on every device, and the same
    as diffusers' pipelines draw for `generator=torch.Generator().manual_seed(seed)`."""
    return torch.randn((1, *shape), generator=torch.Generator().manual_seed(int(seed)), dtype=torch.float32)


def resolve_dtype(dtype: str, device: torch.device) -> torch.dtype:
    """"auto" is float16 on a GPU (twice the speed of float32 at the same quality for inference) and float32 on
    a CPU (where float16 matmuls are slow or missing)."""
    if dtype == "auto":
        return torch.float16 if device.type == "cuda" else torch.float32
    choices = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
    if dtype not in choices:
        raise ValueError(f"dtype {dtype!r} is not one of auto, {', '.join(choices)}")
    return choices[dtype]


class OneStepImageGenerator:
    """An exported one-step generator on one device, turning batches of jobs into uint8 images."""

    def __init__(self, folder: str, device: str | torch.device = "cpu", dtype: str = "auto"):
        info = read_generator_info(folder)
        self.device = torch.device(device)
        self.dtype = resolve_dtype(dtype, self.device)
        self.components = models.load_teacher(folder, torch_dtype=self.dtype).to(device=self.device)
        self.generator = OneStepGenerator(self.components.denoiser(), self.components.schedule,
                                          self.components.prediction_type, info.get("generator_timestep"))
        self.info = info
        c = self.components
        self.native_size = ImageSize(c.default_resolution, c.default_resolution)
        # A latent side must survive the UNet's downsamplings (2 per down block but the last) exactly.
        self.size_multiple = c.vae_scale_factor * 2 ** (len(c.unet.config.down_block_types) - 1)

    def check_size(self, size: ImageSize) -> None:
        m = self.size_multiple
        if size.width % m or size.height % m:
            raise ValueError(f"size {size} is not supported by this generator: width and height must be multiples of {m}")

    @torch.inference_mode()
    def generate(self, jobs: Sequence[GenerationJob]) -> list[np.ndarray]:
        """One [n, H, W, 3] uint8 array per job. Jobs of one size run as one batch; equal prompts are encoded once."""
        results: list[np.ndarray | None] = [None] * len(jobs)
        for size in sorted({job.size for job in jobs}):
            indices = [i for i, job in enumerate(jobs) if job.size == size]
            images = self._generate_same_size([jobs[i] for i in indices], size)
            start = 0
            for i in indices:
                results[i] = images[start : start + jobs[i].num_images]
                start += jobs[i].num_images
        return results  # type: ignore[return-value]

    def _generate_same_size(self, jobs: Sequence[GenerationJob], size: ImageSize) -> np.ndarray:
        c = self.components
        latent_shape = (int(c.unet.config.in_channels), size.height // c.vae_scale_factor, size.width // c.vae_scale_factor)
        prompts = [job.prompt for job in jobs for _ in job.seeds]
        unique = list(dict.fromkeys(prompts))
        embeddings = c.encode_prompts(unique)
        embeddings = embeddings[torch.tensor([unique.index(p) for p in prompts], device=embeddings.device)]
        noise = torch.cat([seeded_noise(seed, latent_shape) for job in jobs for seed in job.seeds])
        noise = noise.to(self.device, self.dtype)
        x0 = self.generator(noise, embeddings)
        return to_uint8(c.decode(x0))

    def warmup(self, max_batch_size: int, sizes: Sequence[ImageSize] = ()) -> None:
        """Generates once per size and batch size before the first user does, who would otherwise pay for lazy
        initialisation, kernel selection and allocator growth (seconds on a GPU, for every new batch shape). On a
        CPU only the largest batch is run: nothing there depends on the shape for long."""
        batch_sizes = range(1, max_batch_size + 1) if self.device.type == "cuda" else [max_batch_size]
        for size in sizes or [self.native_size]:
            for batch_size in batch_sizes:
                self.generate([GenerationJob("warm-up", tuple(range(batch_size)), size)])
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)


def png_bytes(image: np.ndarray, compress_level: int = 1) -> bytes:
    """PNG of an [H, W, 3] uint8 array. Level 1 compresses a 512x512 image several times faster than PIL's
    default 6, for files about 10-20% larger: on a GPU replica, encoding is a visible share of the request."""
    from PIL import Image

    buffer = io.BytesIO()
    Image.fromarray(image).save(buffer, format="PNG", compress_level=compress_level)
    return buffer.getvalue()
