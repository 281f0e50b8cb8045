"""A Stable Diffusion-style text-to-image teacher: the five diffusers components behind a small API.

A teacher is the five components of a diffusers StableDiffusionPipeline (CLIP tokenizer and text encoder, a
UNet2DConditionModel, an AutoencoderKL and a discrete scheduler) behind a small API: prompts -> embeddings,
latents -> images, and the UNet as a `(x_t, t, cond) -> prediction` denoiser (see method/denoiser.py).
Loading one from a name, folder, s3:// prefix or hub id is resolve.py's job; building one is architectures.py's.
"""
from __future__ import annotations

import functools
import json
import os
import shutil
import tempfile
import uuid
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from dmd_ray import compile_cache
from dmd_ray.data import storage
from dmd_ray.method.schedule import NoiseSchedule, check_prediction_type
from dmd_ray.method.transfer import to_device
from dmd_ray.typed_config import ConfigError

COMPONENTS = ("tokenizer", "text_encoder", "unet", "vae", "scheduler")
_NETWORKS = ("text_encoder", "unet", "vae")


def _module_dtype(module: nn.Module) -> torch.dtype:
    return next(module.parameters()).dtype


def _module_device(module: nn.Module) -> torch.device:
    return next(module.parameters()).device


def pad_rows(x: Tensor, rows: int) -> Tensor:
    """`x` grown to `rows` rows with copies of its last one: a compiled graph's static batch for a shorter batch,
    whose extra outputs the caller drops."""
    return torch.cat([x, x[-1:].expand(rows - len(x), *x.shape[1:])]) if rows > len(x) else x


def freeze(*modules: nn.Module) -> None:
    """Teachers are frozen: eval mode (no dropout) and no gradients; a trainable copy turns them back on."""
    for m in modules:
        m.eval()
        m.requires_grad_(False)


FEATURE_LEVELS = ("bottleneck", "decoder")


def feature_channels(unet: nn.Module, level: str) -> int:
    """Channels of `unet_features(..., level)`: the mid block keeps the deepest width, the last up block the first."""
    widths = unet.config.block_out_channels
    return int(widths[-1] if level == "bottleneck" else widths[0])


def unet_features(unet: nn.Module, sample: Tensor, timestep: Tensor, encoder_hidden_states: Tensor, level: str = "bottleneck") -> Tensor:
    """Features of a diffusers UNet2DConditionModel for the GAN's classifier: "bottleneck", the mid block's output
    (DMD2's choice; the up blocks, about half the network's work, are skipped), or "decoder", the last up block's
    output at the latent resolution (before the output convolution), where a small shape's corners are still
    resolved: the demo teacher's bottleneck is 2x2 for 8x8 latents. The same modules in the same order as the UNet's
    own forward, so the features are the ones a full forward computes."""
    config = unet.config
    if level not in FEATURE_LEVELS:
        raise ValueError(f"the GAN's classifier reads one of {FEATURE_LEVELS}, not {level!r}")
    if getattr(unet, "mid_block", None) is None:
        raise ValueError("the GAN's classifier reads the UNet's mid block, and this UNet has none")
    if config.class_embed_type is not None or config.addition_embed_type is not None:
        raise ValueError("the GAN's classifier supports UNets conditioned on text embeddings only (no class or added embeddings)")
    if config.center_input_sample:
        sample = 2 * sample - 1.0
    emb = unet.time_embedding(unet.get_time_embed(sample=sample, timestep=timestep), None)
    if unet.time_embed_act is not None:
        emb = unet.time_embed_act(emb)
    encoder_hidden_states = unet.process_encoder_hidden_states(encoder_hidden_states=encoder_hidden_states, added_cond_kwargs=None)
    text = {"encoder_hidden_states": encoder_hidden_states}
    hidden = unet.conv_in(sample)
    skips = (hidden,)
    for block in unet.down_blocks:
        hidden, block_skips = block(hidden_states=hidden, temb=emb, **(text if getattr(block, "has_cross_attention", False) else {}))
        skips += block_skips
    hidden = unet.mid_block(hidden, emb, **(text if getattr(unet.mid_block, "has_cross_attention", False) else {}))
    if level == "bottleneck":
        return hidden
    # the forward passes each up block its output size only where the latents do not halve evenly at every level
    uneven = any(size % 2**unet.num_upsamplers for size in sample.shape[-2:])
    upsample_size = None
    for i, block in enumerate(unet.up_blocks):
        block_skips, skips = skips[-len(block.resnets):], skips[:-len(block.resnets)]
        if uneven and i < len(unet.up_blocks) - 1:
            upsample_size = skips[-1].shape[2:]
        hidden = block(hidden_states=hidden, temb=emb, res_hidden_states_tuple=block_skips, upsample_size=upsample_size,
                       **(text if getattr(block, "has_cross_attention", False) else {}))
    return hidden


class UNetDenoiser(nn.Module):
    """(x_t, t, cond) -> unet(x_t, t, encoder_hidden_states=cond).sample: a diffusers UNet as a denoiser.

    A Module (not a plain callable) so that it can be wrapped, moved and have its parameters handed to an optimiser
    like the UNet itself.
    """

    def __init__(self, unet: nn.Module, classifier: nn.Module | None = None):
        super().__init__()
        self.unet = unet
        self.classifier = classifier  # DMD2's GAN head (the fake score's; method/gan.py), on its `features` level
        self._compiled_logits = None  # compile_classifier's

    def forward(self, x_t: Tensor, t: Tensor, cond: Tensor, classify: bool = False) -> Tensor:
        """The UNet's prediction; with `classify`, the classifier's [B] logits on the UNet's features instead. One
        call (not a separate method) so that a DeepSpeed engine wrapping this module runs both under its autocast
        and parameter hooks."""
        if not isinstance(cond, Tensor):
            raise TypeError(f"a text-to-image UNet is conditioned on [B, L, D] text embeddings, not {type(cond).__name__}")
        dtype = _module_dtype(self.unet)
        x_t, t, cond = x_t.to(dtype), torch.as_tensor(t, device=x_t.device), cond.to(dtype)
        if classify:
            return (self._compiled_logits or self.logits)(x_t, t, cond)
        return self.unet(x_t, t, encoder_hidden_states=cond, return_dict=False)[0]

    def logits(self, x_t: Tensor, t: Tensor, cond: Tensor) -> Tensor:
        if self.classifier is None:
            raise ValueError("classify=True needs a classifier head (gan_weight > 0)")
        return self.classifier(unet_features(self.unet, x_t, t, cond, self.classifier.features))

    def compile_classifier(self, mode: str | None) -> None:
        """torch.compile the classify path (features and head) as its own graph: the UNet's compiled graph covers
        the full forward only. The discriminator's loss calls it twice (generated and real samples) before one
        backward, so it compiles without CUDA graphs, whose replays reuse their output buffers: fused kernels, the
        host still launching them."""
        if mode is not None and self.classifier is not None:
            compile_cache.stable_keys()
            self._compiled_logits = torch.compile(self.logits, mode="default" if mode == "reduce-overhead" else mode, dynamic=False)


@dataclass(eq=False)
class Teacher:
    tokenizer: Any  # transformers CLIPTokenizer
    text_encoder: nn.Module  # transformers CLIPTextModel
    unet: nn.Module  # diffusers UNet2DConditionModel
    vae: nn.Module  # diffusers AutoencoderKL
    scheduler: Any  # a diffusers scheduler; its config carries the betas and the prediction type
    source: str  # the spec it was loaded from
    _uncond: dict[tuple[torch.device, torch.dtype], Tensor] = field(default_factory=dict, init=False, repr=False)

    # ----------------------------------------------------------------------------------------- properties
    @property
    def prediction_type(self) -> str:
        prediction_type = self.scheduler.config.get("prediction_type", "epsilon")
        check_prediction_type(prediction_type)
        return prediction_type

    @functools.cached_property
    def schedule(self) -> NoiseSchedule:
        return NoiseSchedule.from_scheduler(self.scheduler)

    @property
    def vae_scale_factor(self) -> int:
        return 2 ** (len(self.vae.config.block_out_channels) - 1)

    @property
    def default_resolution(self) -> int:
        sample_size = self.unet.config.sample_size
        sample_size = sample_size if isinstance(sample_size, int) else sample_size[0]
        return int(sample_size) * self.vae_scale_factor

    def latent_shape(self, resolution: int) -> tuple[int, int, int]:
        f = self.vae_scale_factor
        if resolution <= 0 or resolution % f:
            raise ConfigError(f"resolution {resolution} is not a positive multiple of the VAE's scale factor {f}")
        return (int(self.unet.config.in_channels), resolution // f, resolution // f)

    # ----------------------------------------------------------------------------------------- text
    @torch.no_grad()
    def encode_prompts(self, prompts: list[str]) -> Tensor:
        """[B, L, D] text embeddings, computed as StableDiffusionPipeline does (last hidden state, no clip skip)."""
        if isinstance(prompts, str):
            prompts = [prompts]
        # Some tokenizers are saved without a length (model_max_length ~1e30): never exceed the position table.
        max_length = min(self.tokenizer.model_max_length, self.text_encoder.config.max_position_embeddings)
        tokens = self.tokenizer(list(prompts), padding="max_length", max_length=max_length, truncation=True, return_tensors="pt")
        device = _module_device(self.text_encoder)
        attention_mask = None
        if getattr(self.text_encoder.config, "use_attention_mask", False):
            attention_mask = to_device(tokens.attention_mask, device)
        return self.text_encoder(to_device(tokens.input_ids, device), attention_mask=attention_mask).last_hidden_state

    def uncond_embedding(self) -> Tensor:
        """The empty prompt's embedding, [1, L, D]: the null condition of classifier-free guidance. Cached per
        device/dtype of the text encoder, so moving the encoder never hands back a stale tensor."""
        key = (_module_device(self.text_encoder), _module_dtype(self.text_encoder))
        if key not in self._uncond:
            self._uncond[key] = self.encode_prompts([""])
        return self._uncond[key]

    # ----------------------------------------------------------------------------------------- images
    def decode(self, latents: Tensor) -> Tensor:
        """Latents -> images in [-1, 1] (not clamped). Differentiable: regression losses backpropagate through it."""
        cfg = self.vae.config
        latents = latents.to(_module_dtype(self.vae)) / cfg.scaling_factor
        if cfg.get("shift_factor") is not None:  # None for SD 1.x/2.x; SD3/Flux-style VAEs shift as well
            latents = latents + cfg.shift_factor
        return self.vae.decode(latents, return_dict=False)[0]

    @torch.no_grad()
    def encode(self, images: Tensor) -> Tensor:
        """Images in [-1, 1] -> latents (the posterior's mean), the inverse of `decode`."""
        cfg = self.vae.config
        latents = self.vae.encode(images.to(_module_dtype(self.vae))).latent_dist.mean
        if cfg.get("shift_factor") is not None:
            latents = latents - cfg.shift_factor
        return latents * cfg.scaling_factor

    def denoiser(self, unet: nn.Module | None = None) -> UNetDenoiser:
        """The teacher's UNet (or a copy of it, e.g. the generator's or the fake score's) as a denoiser."""
        return UNetDenoiser(self.unet if unet is None else unet)

    # ----------------------------------------------------------------------------------------- placement, saving
    def to(self, device: torch.device | str | None = None, dtype: torch.dtype | None = None) -> "Teacher":
        for name in _NETWORKS:
            module = getattr(self, name)
            # only what changes: diffusers warns on every dtype cast, even a no-op one
            kwargs = {}
            if device is not None and _module_device(module) != torch.device(device):
                kwargs["device"] = device
            if dtype is not None and _module_dtype(module) != dtype:
                kwargs["dtype"] = dtype
            if kwargs:
                module.to(**kwargs)
        return self

    def publish(self, uri: str, extra_files: dict[str, bytes] | None = None) -> str:
        """Saves the folder at `uri`: a local folder (atomically), or an s3:// prefix (staged locally, then
        uploaded file by file). Returns `uri`."""
        if not storage.is_s3(uri):
            self.save(storage.resolve(uri)[1], extra_files)
            return uri
        with tempfile.TemporaryDirectory(prefix="dmd-ray-publish-") as d:
            self.save(os.path.join(d, "folder"), extra_files)
            return storage.upload_tree(os.path.join(d, "folder"), uri)

    def save(self, path: str, extra_files: dict[str, bytes] | None = None) -> None:
        """Writes a diffusers StableDiffusionPipeline folder (safetensors weights), atomically.

        The folder (with `extra_files`, name -> bytes) is written beside `path` under a temporary name and renamed into
        place, so a reader never sees a half-written teacher; an existing folder at `path` is replaced.
        """
        from diffusers import StableDiffusionPipeline

        if storage.is_s3(path):
            raise ValueError(f"save() writes a local folder, not {path!r}: save locally, then upload the folder")
        path = os.path.abspath(os.path.expanduser(path))
        parent = os.path.dirname(path)
        os.makedirs(parent, exist_ok=True)
        tmp = tempfile.mkdtemp(prefix=f".{os.path.basename(path)}.", suffix=".tmp", dir=parent)
        old = None
        try:
            # The pipeline's constructor "fixes" outdated scheduler configs in place (steps_offset, clip_sample);
            # hand it a copy so that saving never changes this teacher's scheduler.
            scheduler = type(self.scheduler).from_config(self.scheduler.config)
            pipe = StableDiffusionPipeline(
                vae=self.vae,
                text_encoder=self.text_encoder,
                tokenizer=self.tokenizer,
                unet=self.unet,
                scheduler=scheduler,
                safety_checker=None,
                feature_extractor=None,
                requires_safety_checker=False,
            )
            pipe.save_pretrained(tmp, safe_serialization=True)
            _drop_source_paths(tmp)
            for name, data in (extra_files or {}).items():
                with open(os.path.join(tmp, name), "wb") as f:
                    f.write(data)
            if os.path.exists(path):
                old = os.path.join(parent, f".{os.path.basename(path)}.{uuid.uuid4().hex}.old")
                os.rename(path, old)
            os.rename(tmp, path)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
            if old is not None:
                shutil.rmtree(old, ignore_errors=True)


def _drop_source_paths(folder: str) -> None:
    """diffusers writes the folder a component was loaded from into its config ("_name_or_path"): a local path of
    the machine that saved it, meaningless elsewhere. Saved folders leave it out."""
    for root, _, files in os.walk(folder):
        for name in files:
            if name.endswith("config.json"):
                path = os.path.join(root, name)
                with open(path) as f:
                    config = json.load(f)
                if isinstance(config, dict) and config.pop("_name_or_path", None) is not None:
                    with open(path, "w") as f:
                        json.dump(config, f, indent=2, sort_keys=True)


# Weight and activation dtypes by name, as configs spell them.
DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def resolve_dtype(name: str, device: torch.device | str) -> torch.dtype:
    """A dtype by name; "auto" is float16 on a GPU (twice float32's speed at the same quality for inference) and
    float32 on a CPU (where float16 matmuls are slow or missing)."""
    if name == "auto":
        return torch.float16 if torch.device(device).type == "cuda" else torch.float32
    if name not in DTYPES:
        raise ValueError(f"dtype {name!r} is not one of auto, {', '.join(DTYPES)}")
    return DTYPES[name]
