"""Stable Diffusion-style text-to-image teachers: loading them, and building a tiny one with no downloads.

A teacher is the five components of a diffusers StableDiffusionPipeline (CLIP tokenizer and text encoder, a
UNet2DConditionModel, an AutoencoderKL and a discrete scheduler) behind a small API: prompts -> embeddings,
latents -> images, and the UNet as a `(x_t, t, cond) -> prediction` denoiser (see denoiser.py).

`load_teacher` accepts "tiny", a local diffusers folder, an s3:// prefix holding one, or a Hugging Face hub id.
Weights are read from safetensors only: a pickle (.bin/.ckpt) can run code when loaded, and a teacher folder may
come from anywhere.

`build_tiny_teacher` is the real SD architecture at toy width with seeded random weights and a tokenizer generated
here, so tests and CPU smoke runs exercise exactly the code paths of SD 1.5 without touching the network.
"""
from __future__ import annotations

import functools
import glob
import hashlib
import json
import os
import re
import shutil
import tempfile
import uuid
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from dmd_ray import storage
from dmd_ray.schedule import NoiseSchedule, _check_prediction_type

COMPONENTS = ("tokenizer", "text_encoder", "unet", "vae", "scheduler")
_NETWORKS = ("text_encoder", "unet", "vae")

# What is fetched from an s3:// teacher prefix: the five components' safetensors weights, configs and tokenizer
# files (vocab.json, merges.txt, tokenizer.json, ...), and model_index.json. Pickles (.bin, .ckpt), READMEs and other
# pipeline parts (safety_checker/, feature_extractor/) of a raw hub snapshot are left behind.
S3_ALLOWED_SUFFIXES = (".safetensors", ".json", ".txt")


def _wanted_from_s3(relative_path: str) -> bool:
    parts = relative_path.split("/")
    if parts == ["model_index.json"]:
        return True
    return len(parts) == 2 and parts[0] in COMPONENTS and parts[1].endswith(S3_ALLOWED_SUFFIXES)
_PICKLE_SUFFIXES = (".bin", ".ckpt", ".pt", ".pth", ".pkl")


def default_cache_dir() -> str:
    return os.path.join(os.path.expanduser("~"), ".cache", "dmd_ray", "teachers")


class TeacherNotFoundError(ValueError):
    """A teacher spec that names nothing loadable; the message names the spec and what was tried."""


def _module_dtype(module: nn.Module) -> torch.dtype:
    return next(module.parameters()).dtype


def _module_device(module: nn.Module) -> torch.device:
    return next(module.parameters()).device


def _freeze(*modules: nn.Module) -> None:
    """Teachers are frozen: eval mode (no dropout) and no gradients; a trainable copy turns them back on."""
    for m in modules:
        m.eval()
        m.requires_grad_(False)


class UNetDenoiser(nn.Module):
    """(x_t, t, cond) -> unet(x_t, t, encoder_hidden_states=cond).sample: a diffusers UNet as a denoiser.

    A Module (not a plain callable) so that it can be wrapped, moved and have its parameters handed to an optimiser
    like the UNet itself.
    """

    def __init__(self, unet: nn.Module):
        super().__init__()
        self.unet = unet

    def forward(self, x_t: Tensor, t: Tensor, cond: Tensor) -> Tensor:
        if not isinstance(cond, Tensor):
            raise TypeError(f"a text-to-image UNet is conditioned on [B, L, D] text embeddings, not {type(cond).__name__}")
        dtype = _module_dtype(self.unet)
        t = torch.as_tensor(t, device=x_t.device)
        return self.unet(x_t.to(dtype), t, encoder_hidden_states=cond.to(dtype), return_dict=False)[0]


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
        _check_prediction_type(prediction_type)
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
            raise ValueError(f"resolution {resolution} is not a positive multiple of the VAE's scale factor {f}")
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
            attention_mask = tokens.attention_mask.to(device)
        return self.text_encoder(tokens.input_ids.to(device), attention_mask=attention_mask).last_hidden_state

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

    def save(self, path: str) -> None:
        """Writes a diffusers StableDiffusionPipeline folder (safetensors weights), atomically.

        The folder is written beside `path` under a temporary name and renamed into place, so a reader never sees a
        half-written teacher; an existing folder at `path` is replaced.
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
            if os.path.exists(path):
                old = os.path.join(parent, f".{os.path.basename(path)}.{uuid.uuid4().hex}.old")
                os.rename(path, old)
            os.rename(tmp, path)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
            if old is not None:
                shutil.rmtree(old, ignore_errors=True)


# --------------------------------------------------------------------------------------------- tiny teacher
# Words of the synthetic shapes domain; the generated BPE merges make each of them a single token.
_TINY_WORDS = (
    "a an the and with of on in at to is small large big tiny medium red green blue yellow orange purple pink white "
    "black gray grey brown cyan circle circles square squares triangle triangles star ring cross shape shapes dot "
    "one two three left right top bottom center middle corner upper lower background image photo picture"
).split()
_TINY_MAX_LENGTH = 16  # SD uses 77; short sequences keep the tiny text encoder and cross-attention cheap


def _bytes_to_unicode() -> dict[int, str]:
    """CLIP's (and GPT-2's) reversible map from bytes to printable unicode characters: the BPE base alphabet."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, map(chr, cs)))


def _learn_merges(words: list[str]) -> list[tuple[str, str]]:
    """Plain BPE learning until every word is one symbol: the most frequent adjacent pair first, ties broken by
    the pair itself, so the merges are deterministic. Learned (rather than hand-listed word by word) merges never
    conflict: applying them in rank order, as the tokenizer does, replays the learning and ends in single tokens."""
    seqs = [tuple(w[:-1]) + (w[-1] + "</w>",) for w in dict.fromkeys(words)]
    merges: list[tuple[str, str]] = []
    while True:
        counts: dict[tuple[str, str], int] = {}
        for s in seqs:
            for pair in zip(s, s[1:]):
                counts[pair] = counts.get(pair, 0) + 1
        if not counts:
            return merges
        best = min(counts, key=lambda p: (-counts[p], p))
        merges.append(best)
        merged = []
        for s in seqs:
            out, i = [], 0
            while i < len(s):
                if i + 1 < len(s) and (s[i], s[i + 1]) == best:
                    out.append(s[i] + s[i + 1])
                    i += 2
                else:
                    out.append(s[i])
                    i += 1
            merged.append(tuple(out))
        seqs = merged


def _tiny_tokenizer() -> Any:
    """A CLIPTokenizer over CLIP's byte-level alphabet plus the shapes-domain merges, from files written here.

    Vocabulary order follows CLIP's: bytes, bytes + "</w>", merges, then <|startoftext|> and <|endoftext|>.
    """
    from transformers import CLIPTokenizer

    alphabet = list(_bytes_to_unicode().values())
    merges = _learn_merges(_TINY_WORDS)
    vocab = alphabet + [c + "</w>" for c in alphabet] + ["".join(m) for m in merges] + ["<|startoftext|>", "<|endoftext|>"]
    with tempfile.TemporaryDirectory(prefix="dmd-ray-tiny-tokenizer-") as d:
        vocab_file, merges_file = os.path.join(d, "vocab.json"), os.path.join(d, "merges.txt")
        with open(vocab_file, "w", encoding="utf-8") as f:
            json.dump({tok: i for i, tok in enumerate(vocab)}, f, ensure_ascii=False)
        with open(merges_file, "w", encoding="utf-8") as f:
            f.write("#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in merges))
        # transformers 5 builds the `tokenizers` backend at construction, so the files may go away afterwards;
        # save_pretrained() writes tokenizer.json from that backend.
        tokenizer = CLIPTokenizer(vocab_file, merges_file, model_max_length=_TINY_MAX_LENGTH)
    tokenizer.vocab_file = None  # do not keep pointing at the deleted temporary file
    return tokenizer


def build_small_sd(
    seed: int = 0,
    prediction_type: str = "epsilon",
    text_width: int = 32,
    unet_channels: tuple[int, ...] = (32, 64),
    attention_levels: tuple[bool, ...] = (False, True),
    vae_channels: tuple[int, ...] = (16, 32, 32),
    source: str = "tiny",
) -> Teacher:
    """SD 1.5's architecture and scheduler at a small size, with seeded random weights and the shapes-domain
    tokenizer; no downloads. 32x32 images; latents of 4 channels at 32 / 2**(len(vae_channels) - 1) pixels;
    16-token prompts. The global RNG state is left untouched."""
    from diffusers import AutoencoderKL, DDIMScheduler, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    _check_prediction_type(prediction_type)
    tokenizer = _tiny_tokenizer()
    latent_size = 32 // 2 ** (len(vae_channels) - 1)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        text_encoder = CLIPTextModel(
            CLIPTextConfig(
                vocab_size=len(tokenizer),
                hidden_size=text_width,
                intermediate_size=2 * text_width,
                projection_dim=text_width,
                num_hidden_layers=2,
                num_attention_heads=2,
                max_position_embeddings=_TINY_MAX_LENGTH,
                bos_token_id=tokenizer.bos_token_id,
                eos_token_id=tokenizer.eos_token_id,
                pad_token_id=tokenizer.pad_token_id,
            )
        )
        unet = UNet2DConditionModel(
            sample_size=latent_size,
            in_channels=4,
            out_channels=4,
            down_block_types=tuple("CrossAttnDownBlock2D" if a else "DownBlock2D" for a in attention_levels),
            up_block_types=tuple("CrossAttnUpBlock2D" if a else "UpBlock2D" for a in reversed(attention_levels)),
            block_out_channels=unet_channels,
            layers_per_block=1,
            cross_attention_dim=text_width,
            attention_head_dim=4,
            norm_num_groups=8,
        )
        vae = AutoencoderKL(
            in_channels=3,
            out_channels=3,
            down_block_types=("DownEncoderBlock2D",) * len(vae_channels),
            up_block_types=("UpDecoderBlock2D",) * len(vae_channels),
            block_out_channels=vae_channels,
            layers_per_block=1,
            latent_channels=4,
            norm_num_groups=8,
            sample_size=32,
            scaling_factor=0.18215,
        )
    scheduler = DDIMScheduler(
        num_train_timesteps=1000,
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        steps_offset=1,
        set_alpha_to_one=False,
        clip_sample=False,
        prediction_type=prediction_type,
    )
    _freeze(text_encoder, unet, vae)
    return Teacher(tokenizer, text_encoder, unet, vae, scheduler, source=source)


def build_tiny_teacher(seed: int = 0, prediction_type: str = "epsilon") -> Teacher:
    """The smallest SD: 32x32 images, 4x8x8 latents, 32-dim text; for tests and smoke runs (random weights)."""
    return build_small_sd(seed, prediction_type)


def build_demo_architecture(seed: int = 0, prediction_type: str = "epsilon") -> Teacher:
    """The `demo` teacher's architecture, untrained: jobs/train_teacher.py trains it on the shapes domain."""
    return build_small_sd(seed, prediction_type, text_width=64, unet_channels=(48, 96, 96), attention_levels=(False, True, True),
                          vae_channels=(32, 64, 64), source="demo-architecture")


def build_sd15_architecture(seed: int = 0, prediction_type: str = "epsilon") -> Teacher:
    """Stable Diffusion 1.5's architecture (860M-parameter UNet, CLIP ViT-L/14 text encoder, the SD VAE) with
    seeded random weights: for measuring speed and memory, which do not depend on the weights. Its tokenizer is the
    tiny one at SD's 77-token length (token ids only need to index the embedding table)."""
    from diffusers import AutoencoderKL, PNDMScheduler, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    tokenizer = _tiny_tokenizer()
    tokenizer.model_max_length = 77
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        text_encoder = CLIPTextModel(
            CLIPTextConfig(vocab_size=49408, hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
                           max_position_embeddings=77, hidden_act="quick_gelu", projection_dim=768,
                           bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
        )
        unet = UNet2DConditionModel(sample_size=64, cross_attention_dim=768, attention_head_dim=8)
        vae = AutoencoderKL(
            down_block_types=("DownEncoderBlock2D",) * 4,
            up_block_types=("UpDecoderBlock2D",) * 4,
            block_out_channels=(128, 256, 512, 512),
            layers_per_block=2,
            latent_channels=4,
            sample_size=512,
            scaling_factor=0.18215,
        )
    scheduler = PNDMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", steps_offset=1,
                              set_alpha_to_one=False, skip_prk_steps=True, prediction_type=prediction_type)
    _freeze(text_encoder, unet, vae)
    return Teacher(tokenizer, text_encoder, unet, vae, scheduler, source="sd15-architecture")


BUILT_IN = {"tiny": build_tiny_teacher, "sd15-architecture": build_sd15_architecture}

# Trained models that ship inside the package (see README, "The demo teacher"): name -> local diffusers folder.
ASSETS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "assets")
PACKAGED_TEACHERS = {"demo": os.path.join(ASSETS, "demo-teacher")}

# Exported one-step generators that ship inside the package: name -> local diffusers folder (see export.py).
BUILT_IN_GENERATORS: dict[str, str] = {"demo": os.path.join(ASSETS, "demo-generator")}


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


# --------------------------------------------------------------------------------------------- loading
def _looks_like_path(spec: str) -> bool:
    """Hub ids are "name" or "owner/name"; anything with more structure than that was meant as a path."""
    return spec.startswith(("/", ".", "~", "file://")) or "\\" in spec or spec.count("/") > 1 or os.path.isabs(spec)


def _brief(e: BaseException, limit: int = 300) -> str:
    text = " ".join(str(e).split()) or type(e).__name__
    text = text if len(text) <= limit else text[: limit - 3] + "..."
    return f"{type(e).__name__}: {text}"


def _folder_problems(folder: str) -> list[str]:
    """What keeps `folder` from being a safetensors diffusers teacher; [] when nothing does."""
    problems = []
    for name in COMPONENTS:
        sub = os.path.join(folder, name)
        if not os.path.isdir(sub):
            problems.append(f"no {name}/ subfolder")
            continue
        files = os.listdir(sub)
        if name == "tokenizer":
            if not ({"tokenizer.json", "vocab.json"} & set(files)):
                problems.append("tokenizer/ holds neither tokenizer.json nor vocab.json")
        elif name == "scheduler":
            if "scheduler_config.json" not in files:
                problems.append("scheduler/ has no scheduler_config.json")
        else:
            if "config.json" not in files:
                problems.append(f"{name}/ has no config.json")
            if not glob.glob(os.path.join(glob.escape(sub), "*.safetensors")):
                pickles = sorted(f for f in files if f.endswith(_PICKLE_SUFFIXES))
                if pickles:
                    problems.append(
                        f"{name}/ holds only pickle weights ({', '.join(pickles)}), which are not loaded because they "
                        "can run code; re-save it with save_pretrained(..., safe_serialization=True)"
                    )
                else:
                    problems.append(f"{name}/ holds no .safetensors weights")
    return problems


def _load_components(where: str, source: str, torch_dtype: torch.dtype) -> Teacher:
    """Loads the five components from a local folder or a hub repo (`where`), with safetensors only."""
    import diffusers
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from diffusers.utils import is_accelerate_available
    from transformers import CLIPTextModel, CLIPTokenizer

    scheduler_config = diffusers.DDIMScheduler.load_config(where, subfolder="scheduler")
    class_name = scheduler_config.get("_class_name", "")
    scheduler_cls = getattr(diffusers, class_name, None)
    if scheduler_cls is None or not hasattr(scheduler_cls, "from_pretrained"):
        raise TeacherNotFoundError(f"teacher {source!r}: unknown scheduler class {class_name!r} in scheduler/scheduler_config.json")
    scheduler = scheduler_cls.from_pretrained(where, subfolder="scheduler")
    tokenizer = CLIPTokenizer.from_pretrained(where, subfolder="tokenizer")
    # transformers 5 calls the dtype argument `dtype`; diffusers 0.42 still takes `torch_dtype`. diffusers defaults
    # to low_cpu_mem_usage=True and warns on every load when accelerate (not a dependency) is missing.
    diffusers_kwargs = dict(use_safetensors=True, torch_dtype=torch_dtype, low_cpu_mem_usage=is_accelerate_available())
    text_encoder = CLIPTextModel.from_pretrained(where, subfolder="text_encoder", use_safetensors=True, dtype=torch_dtype)
    unet = UNet2DConditionModel.from_pretrained(where, subfolder="unet", **diffusers_kwargs)
    vae = AutoencoderKL.from_pretrained(where, subfolder="vae", **diffusers_kwargs)
    _freeze(text_encoder, unet, vae)
    return Teacher(tokenizer, text_encoder, unet, vae, scheduler, source=source)


def _load_folder(folder: str, source: str, torch_dtype: torch.dtype) -> Teacher:
    problems = _folder_problems(folder)
    if problems:
        raise TeacherNotFoundError(f"teacher {source!r}: {folder} is not a diffusers teacher folder: {'; '.join(problems)}")
    try:
        return _load_components(folder, source, torch_dtype)
    except TeacherNotFoundError:
        raise
    except Exception as e:  # corrupt or mismatched files: say which teacher, keep the cause chained
        raise TeacherNotFoundError(f"teacher {source!r}: could not load the folder {folder}: {_brief(e)}") from e


def _s3_cache_folder(uri: str, cache_dir: str) -> str:
    """One folder per URI: readable name, plus a hash so that different prefixes with one basename never collide."""
    digest = hashlib.sha256(uri.encode()).hexdigest()[:16]
    name = re.sub(r"[^A-Za-z0-9._-]", "_", uri[len("s3://") :].rsplit("/", 1)[-1])[:64]
    return os.path.join(cache_dir, f"{name}-{digest}")


def _download_s3(uri: str, cache_dir: str | None) -> str:
    """Downloads an s3:// teacher once; later loads reuse the copy (teacher prefixes are treated as immutable)."""
    uri = "s3://" + uri[len("s3://") :].strip("/")  # s3://b/p/ and s3://b/p are one teacher, cached once
    local = _s3_cache_folder(uri, os.path.expanduser(cache_dir or default_cache_dir()))
    try:
        return storage.download_prefix(uri, local, _wanted_from_s3)
    except storage.StorageError as e:  # nothing (usable) under the prefix
        raise TeacherNotFoundError(f"teacher {uri!r}: {e}") from e
    except OSError as e:  # pyarrow: missing bucket, access denied, unreachable endpoint
        raise storage.StorageError(f"cannot download teacher {uri!r}: {_brief(e)}") from e


def _packaged(name: str) -> str:
    folder = PACKAGED_TEACHERS[name]
    if not os.path.isdir(folder):
        raise TeacherNotFoundError(f"the packaged teacher {name!r} is missing from this installation ({folder}); remake it with jobs/train_teacher.py")
    return folder


def load_teacher(spec: str, cache_dir: str | None = None, torch_dtype: torch.dtype = torch.float32) -> Teacher:
    """A frozen teacher (eval mode, requires_grad False) from "tiny", a local folder, an s3:// prefix or a hub id.

    `cache_dir` holds downloaded s3:// teachers (default ~/.cache/dmd_ray/teachers/); hub downloads go to the
    Hugging Face cache as usual. `torch_dtype` applies to the three networks.
    """
    spec = str(spec)
    if spec in BUILT_IN:
        return BUILT_IN[spec]().to(dtype=torch_dtype)
    if spec in PACKAGED_TEACHERS:
        return _load_folder(_packaged(spec), spec, torch_dtype)
    if storage.is_s3(spec):
        return _load_folder(_download_s3(spec, cache_dir), spec, torch_dtype)
    local = os.path.expanduser(spec[len("file://") :] if spec.startswith("file://") else spec)
    if os.path.isdir(local):
        return _load_folder(local, spec, torch_dtype)
    if os.path.exists(local):
        raise TeacherNotFoundError(f"teacher {spec!r} is a file; expected a diffusers folder (tokenizer/, text_encoder/, unet/, vae/, scheduler/)")
    if _looks_like_path(spec):
        raise TeacherNotFoundError(f"teacher {spec!r}: no such folder ({os.path.abspath(local)} does not exist)")
    try:
        return _load_components(spec, spec, torch_dtype)
    except Exception as e:
        from huggingface_hub import constants

        offline = " HF_HUB_OFFLINE is set, so only the local Hugging Face cache was searched." if constants.HF_HUB_OFFLINE else ""
        raise TeacherNotFoundError(
            f"teacher {spec!r} is neither 'tiny', an existing folder, an s3:// URI, nor a Hugging Face hub id that "
            f"could be loaded with safetensors weights ({_brief(e)}).{offline}"
        ) from e


@dataclass(frozen=True)
class TeacherInfo:
    """What a driver needs to know about a teacher without loading its weights."""

    source: str
    latent_channels: int
    vae_scale_factor: int
    sample_size: int
    prediction_type: str

    @property
    def default_resolution(self) -> int:
        return self.sample_size * self.vae_scale_factor

    def latent_shape(self, resolution: int) -> tuple[int, int, int]:
        f = self.vae_scale_factor
        if resolution <= 0 or resolution % f:
            raise ValueError(f"resolution {resolution} is not a positive multiple of the VAE's scale factor {f}")
        return (self.latent_channels, resolution // f, resolution // f)


def describe_teacher(spec: str, cache_dir: str | None = None) -> TeacherInfo:
    """Reads a teacher's configs (no weights) and checks that it can be loaded: fails fast, before any sampling.

    Local folders are checked for all five components; s3:// teachers are downloaded into the cache (which the
    workers on this machine then reuse); hub ids have their configs fetched.
    """
    import diffusers

    spec = str(spec)
    if spec == "tiny":
        t = build_tiny_teacher()
        return TeacherInfo(spec, t.unet.config.in_channels, t.vae_scale_factor, t.unet.config.sample_size, t.prediction_type)
    if spec == "sd15-architecture":
        return TeacherInfo(spec, 4, 8, 64, "epsilon")
    if spec in PACKAGED_TEACHERS:
        spec = _packaged(spec)
    if storage.is_s3(spec):
        where = _download_s3(spec, cache_dir)
    else:
        where = os.path.expanduser(spec[len("file://") :] if spec.startswith("file://") else spec)
        if not os.path.isdir(where) and (_looks_like_path(spec) or os.path.exists(where)):
            raise TeacherNotFoundError(f"teacher {spec!r}: no such folder ({os.path.abspath(where)} does not exist)")
    if os.path.isdir(where):
        problems = _folder_problems(where)
        if problems:
            raise TeacherNotFoundError(f"teacher {spec!r}: {where} is not a diffusers teacher folder: {'; '.join(problems)}")
    try:
        unet = diffusers.UNet2DConditionModel.load_config(where, subfolder="unet")
        vae = diffusers.AutoencoderKL.load_config(where, subfolder="vae")
        scheduler = diffusers.DDIMScheduler.load_config(where, subfolder="scheduler")
    except Exception as e:
        raise TeacherNotFoundError(f"teacher {spec!r} is neither 'tiny', an existing folder, an s3:// URI, nor a reachable hub id ({_brief(e)})") from e
    sample_size = unet.get("sample_size", 64)
    sample_size = sample_size if isinstance(sample_size, int) else sample_size[0]
    prediction_type = scheduler.get("prediction_type", "epsilon")
    _check_prediction_type(prediction_type)
    return TeacherInfo(spec, int(unet["in_channels"]), 2 ** (len(vae["block_out_channels"]) - 1), int(sample_size), prediction_type)
