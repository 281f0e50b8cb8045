"""The one-step generator as an image service needs it, without Ray: batches of jobs in, uint8 images out.

`serve/` wraps this in Ray Serve (HTTP, request validation, batching across requests, replicas); the benchmark runs
the same code bare. `OneStepImageGenerator.generate(jobs)` runs many jobs in one forward pass of tokenizer -> text
encoder -> UNet at the generator's timestep -> x0 -> VAE decode: what the exported pipeline computes with
num_inference_steps=1 and guidance_scale=1.0, minus its per-call overhead, and with one seed per image.

Determinism: image i of a request with seed s is drawn from noise seeded s + i (mod 2**32), generated on the CPU
in float32 whatever the device, so a seed means the same noise everywhere, and `n` images are the same images as
`n` single requests with consecutive seeds. The networks' arithmetic may still differ in the last bits between
batch compositions and devices (different kernels), which can move a pixel by one level of 255.
"""
from __future__ import annotations

import contextlib
import re
import secrets
from dataclasses import dataclass
from typing import Sequence

import numpy as np
import torch

from dmd_ray import compile_cache
from dmd_ray.images import to_uint8_tensor
from dmd_ray.method.generator import OneStepGenerator
from dmd_ray.method.sampling import seeded_noise
from dmd_ray.method.transfer import to_device
from dmd_ray.typed_config import ConfigError
from dmd_ray.sd.resolve import check_tiny_decoder, load_teacher, load_tiny_decoder, read_generator_info
from dmd_ray.sd.teacher import pad_rows, resolve_dtype

SEED_MODULUS = 2**32  # seeds are uint32: exact in a browser's JSON numbers (up to 2**53), easy to type and share
# Inductor options of the tuned generator: a 1x1 convolution in channels-last is a matmul, and cuBLAS runs it faster
# than a convolution kernel (diffusers' and PyTorch's published SD inference recipe).
TUNED_INDUCTOR_OPTIONS = {"conv_1x1_as_mm": True}


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


def batch_bucket(n: int) -> int:
    """The batch a compiled generator runs `n` images in: the next power of two."""
    return 1 << (n - 1).bit_length()


def refuse_multi_step(info: dict, name: str) -> None:
    """The one-step service's check of a generator's dmd_ray.json: a multi-step (DMD2) generator is refused by name."""
    steps = len(info.get("generator_timesteps", [0]))
    if steps > 1:
        raise ConfigError(f"{name} holds a {steps}-step generator; this service runs one-step generators "
                          f"(run it with diffusers: num_inference_steps={steps}, guidance_scale=1.0)")


class OneStepImageGenerator:
    """An exported one-step generator on one device, turning batches of jobs into uint8 images."""

    def __init__(self, folder: str, device: str | torch.device = "cpu", dtype: str = "auto", decoder: str = "", cache_dir: str | None = None,
                 compile_mode: str = "", static_shapes: bool = False, tuned: bool = False, skip_guards: bool = True):
        """`decoder`: "" decodes with the generator's own VAE; else a tiny latent decoder (resolve.load_tiny_decoder:
        demo-tiny, a folder, s3:// or a hub id such as madebyollin/taesd), several times cheaper at some quality cost.
        `compile_mode`: "" runs eager; else the text encoder, the UNet and the decoder are torch.compile'd in that
        mode: "reduce-overhead" replays CUDA graphs, one per power-of-two batch (of distinct prompts for the text
        encoder, of images for the others) and image size, recorded by `warmup` (call generate from one thread: CUDA
        graph trees are per thread). `static_shapes` compiles every bucket and size on its own (the kernels
        specialised to each shape; many times the warm-up) instead of once for batch 1 and once for any batch.
        `tuned`: the UNet and the decoder in channels-last (what cuDNN's fp16 convolutions read without transposing),
        attention's projections fused into one matmul, and TUNED_INDUCTOR_OPTIONS when compiled; same maths.
        `skip_guards`: once `warmup` has compiled every graph a request can need, the compiled networks check only the
        guards that tell their graphs apart (batch 1 from the others), not every weight's (about 0.4 ms of host time
        per network and call at SD 1.5 scale, measured on an H100), as the training loop does (distill_worker.step_guards)."""
        info = read_generator_info(folder)
        refuse_multi_step(info, folder)
        self.device = torch.device(device)
        self.dtype = resolve_dtype(dtype, self.device)
        self.components = load_teacher(folder, torch_dtype=self.dtype).to(device=self.device)
        self.generator = OneStepGenerator(self.components.denoiser(), self.components.schedule,
                                          self.components.prediction_type, info.get("generator_timestep"))
        self.info = info
        c = self.components
        self.decode = c.decode
        decoder_network = c.vae.decoder
        if decoder:
            tiny = load_tiny_decoder(decoder, cache_dir, self.dtype).to(self.device)
            check_tiny_decoder(tiny, int(c.unet.config.in_channels), c.vae_scale_factor, decoder)
            self.decode = lambda latents: tiny.decode(latents.to(self.dtype) / tiny.config.scaling_factor, return_dict=False)[0]
            decoder_network = tiny.decoder
        self.compile_mode = compile_mode
        self.skip_guards = skip_guards
        self.warmed: tuple[set[ImageSize], int] = (set(), 0)  # the sizes and the largest batch `warmup` compiled
        if tuned:
            for network in (c.unet, decoder_network):
                network.to(memory_format=torch.channels_last)
            for model in (c.unet, None if decoder else c.vae):
                if hasattr(model, "fuse_qkv_projections"):
                    model.fuse_qkv_projections()
        if compile_mode:
            compile_cache.stable_keys()  # a replica finds the kernels another process compiled
            # Dynamo's automatic dynamic shapes: batch 1 compiles for its own shape, the next bucket once for any
            # batch, and every later bucket (or image size) reuses those kernels and only records its CUDA graph. With
            # static shapes each bucket compiles again (about 85 s each at SD 1.5 on an H200; 350 s for batches 1-8).
            # torch.compile takes a mode or options, not both: the tuned options go on top of the mode's own
            from torch._inductor import list_mode_options

            settings = {"options": {**list_mode_options(compile_mode), **TUNED_INDUCTOR_OPTIONS}} if tuned else {"mode": compile_mode}
            for network in (c.text_encoder, c.unet, decoder_network):
                network.compile(**settings, dynamic=False if static_shapes else None)
        self.native_size = ImageSize(c.default_resolution, c.default_resolution)
        # A latent side must survive the UNet's downsamplings (2 per down block but the last) exactly.
        self.size_multiple = c.vae_scale_factor * 2 ** (len(c.unet.config.down_block_types) - 1)

    def check_size(self, size: ImageSize) -> None:
        m = self.size_multiple
        if size.width % m or size.height % m:
            raise ValueError(f"size {size} is not supported by this generator: width and height must be multiples of {m}")

    @torch.inference_mode()
    def generate(self, jobs: Sequence[GenerationJob], on_device: bool = False) -> list[np.ndarray] | list[torch.Tensor]:
        """One [n, H, W, 3] uint8 array per job, or with `on_device` one [n, 3, H, W] uint8 tensor on the generator's
        device (for an encoder there: nvJPEG). Jobs of one size run as one batch; equal prompts are encoded once."""
        results: list = [None] * len(jobs)
        with self._guards(jobs):
            for size in sorted({job.size for job in jobs}):
                indices = [i for i, job in enumerate(jobs) if job.size == size]
                images = self._generate_same_size([jobs[i] for i in indices], size)
                images = images if on_device else images.permute(0, 2, 3, 1).cpu().numpy()
                start = 0
                for i in indices:
                    results[i] = images[start : start + jobs[i].num_images]
                    start += jobs[i].num_images
        return results  # type: ignore[return-value]

    def _guards(self, jobs: Sequence[GenerationJob]):
        """Dynamo's guard checks for a call: only the differentiating ones (see `skip_guards`) when `warmup` compiled
        the graphs of every size and batch of these jobs. Elsewhere all of them: with the checks that tell sizes apart
        skipped, a size or batch never compiled would run a graph compiled for another shape."""
        sizes, max_batch = self.warmed
        if (self.compile_mode and self.skip_guards and all(job.size in sizes for job in jobs)
                and sum(job.num_images for job in jobs) <= max_batch):
            return torch.compiler.set_stance(skip_guard_eval_unsafe=True)
        return contextlib.nullcontext()

    @torch.inference_mode()  # as generate: compiled graphs and their guards see one dispatch state (see skip_guards)
    def latents(self, jobs: Sequence[GenerationJob]) -> torch.Tensor:
        """The generator's x0 latents for jobs of one size, before decoding."""
        sizes = {job.size for job in jobs}
        if len(sizes) != 1:
            raise ValueError(f"latents() takes jobs of one size, got {sorted(map(str, sizes))}")
        with self._guards(jobs):
            return self._latents(jobs, sizes.pop())[: sum(job.num_images for job in jobs)]

    def _latents(self, jobs: Sequence[GenerationJob], size: ImageSize) -> torch.Tensor:
        c = self.components
        latent_shape = (int(c.unet.config.in_channels), size.height // c.vae_scale_factor, size.width // c.vae_scale_factor)
        prompts = [job.prompt for job in jobs for _ in job.seeds]
        unique = list(dict.fromkeys(prompts))
        # the host's inputs first, through pinned memory: a pageable copy would wait for the networks queued before it
        prompt_rows = torch.tensor([unique.index(p) for p in prompts])
        noise = torch.stack([seeded_noise(seed, latent_shape) for job in jobs for seed in job.seeds])
        prompt_rows, noise = to_device(prompt_rows, self.device), to_device(noise, self.device, self.dtype)
        if self.compile_mode:
            # one CUDA graph per power-of-two batch (not per batch size), the batch padded with copies of its last
            # row, which is dropped after the network (the callers drop padded images after decoding)
            torch.compiler.cudagraph_mark_step_begin()  # the previous batch's graph outputs are no longer read
            padded = unique + unique[-1:] * (batch_bucket(len(unique)) - len(unique))
            embeddings = c.encode_prompts(padded)[: len(unique)].clone()  # out of the graph's output buffer
        else:
            embeddings = c.encode_prompts(unique)
        embeddings = embeddings[prompt_rows]
        if self.compile_mode:
            bucket = batch_bucket(len(noise))
            noise, embeddings = pad_rows(noise, bucket), pad_rows(embeddings, bucket)
        return self.generator(noise, embeddings)

    def _generate_same_size(self, jobs: Sequence[GenerationJob], size: ImageSize) -> torch.Tensor:
        return to_uint8_tensor(self.decode(self._latents(jobs, size))[: sum(job.num_images for job in jobs)])

    def warmup(self, max_batch_size: int, sizes: Sequence[ImageSize] = ()) -> None:
        """Generates once per size and batch size before the first user does, who would otherwise pay for lazy
        initialisation, kernel selection and allocator growth (seconds on a GPU, for every new batch shape). On a
        CPU only the largest batch is run: nothing there depends on the shape for long."""
        if self.compile_mode:  # at worst a compile per bucket and size: Dynamo must not fall back to eager after its default 8
            batch_sizes = sorted({min(batch_bucket(n), max_batch_size) for n in range(1, max_batch_size + 1)})
            limit = len(batch_sizes) * len(sizes or [self.native_size]) + 2
            torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, limit)
        else:
            batch_sizes = range(1, max_batch_size + 1) if self.device.type == "cuda" else [max_batch_size]
        for size in sizes or [self.native_size]:
            for batch_size in batch_sizes:  # as many distinct prompts as images: the text encoder's graphs too
                self.generate([GenerationJob(f"warm-up {i}", (i,), size) for i in range(batch_size)])
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        self.warmed = (set(sizes or [self.native_size]), max_batch_size)
