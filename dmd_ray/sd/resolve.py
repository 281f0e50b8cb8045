"""One resolver for every model spec, teachers and exported generators alike.

A spec is a built-in name (a teacher built in code, or a folder packaged with dmd-ray), a local diffusers folder
(a path, or file://), an s3:// prefix holding one (downloaded once into a cache), or, for teachers, a Hugging Face
hub id. `locate` turns a spec into a local folder (or the hub id); `load_teacher`, `describe_teacher` and
`resolve_generator` all start there, so the four kinds of spec behave the same everywhere.

Weights are read from safetensors only: a pickle (.bin/.ckpt) can run code when loaded, and a folder may come from
anywhere.
"""
from __future__ import annotations

import glob
import hashlib
import json
import os
import re
from dataclasses import dataclass

import torch

from dmd_ray import ASSETS
from dmd_ray.data import storage
from dmd_ray.method.schedule import check_prediction_type
from dmd_ray.sd.architectures import BUILT_IN
from dmd_ray.sd.teacher import COMPONENTS, Teacher, freeze
from dmd_ray.typed_config import ConfigError

# Trained models that ship inside the package (README, "The demo teacher"): name -> local diffusers folder.
PACKAGED_TEACHERS = {"demo": os.path.join(ASSETS, "demo-teacher")}
# Exported generators that ship inside the package: name -> local diffusers folder (see export.py).
# `demo`: the best one-step student of the demo teacher; `demo-4step`: DMD2's four-step generator of it (evaluated in
# its four steps; diffusers runs it with num_inference_steps=4; the one-step service refuses it)
BUILT_IN_GENERATORS: dict[str, str] = {"demo": os.path.join(ASSETS, "demo-generator"), "demo-4step": os.path.join(ASSETS, "demo-4step-generator")}
# Tiny latent decoders (diffusers AutoencoderTiny, TAESD's architecture) that ship inside the package.
PACKAGED_DECODERS = {"demo-tiny": os.path.join(ASSETS, "demo-tiny-decoder")}

GENERATOR_INFO = "dmd_ray.json"  # what marks a folder as an exported one-step generator (export.py writes it)
GENERATOR_FORMAT = "dmd-ray-generator/1"
_PICKLE_SUFFIXES = (".bin", ".ckpt", ".pt", ".pth", ".pkl")
# What is fetched from an s3:// prefix: the five components' safetensors weights, configs and tokenizer files
# (vocab.json, merges.txt, tokenizer.json, ...), model_index.json, and a generator's dmd_ray.json. Pickles (.bin,
# .ckpt), READMEs and other pipeline parts (safety_checker/, feature_extractor/) of a raw hub snapshot stay behind.
_S3_SUFFIXES = (".safetensors", ".json", ".txt")


class ModelNotFoundError(ConfigError):
    """A spec that names nothing loadable; the message names the spec and what was tried."""


class TeacherNotFoundError(ModelNotFoundError):
    pass


class GeneratorNotFoundError(ModelNotFoundError):
    pass


class DecoderNotFoundError(ModelNotFoundError):
    pass


_ERRORS = {"teacher": TeacherNotFoundError, "generator": GeneratorNotFoundError, "decoder": DecoderNotFoundError}


def _packaged(kind: str) -> dict[str, str]:
    """The packaged models of a kind (read when asked: tests and plugins may register more)."""
    return {"teacher": PACKAGED_TEACHERS, "generator": BUILT_IN_GENERATORS, "decoder": PACKAGED_DECODERS}[kind]


def default_cache_dir(kind: str = "teacher") -> str:
    """Where s3:// models are cached: one folder per kind, since a teacher cached from a prefix lacks dmd_ray.json."""
    return os.path.join(os.path.expanduser("~"), ".cache", "dmd_ray", f"{kind}s")


def brief(e: BaseException, limit: int = 300) -> str:
    text = " ".join(str(e).split()) or type(e).__name__
    text = text if len(text) <= limit else text[: limit - 3] + "..."
    return f"{type(e).__name__}: {text}"


def _looks_like_path(spec: str) -> bool:
    """Hub ids are "name" or "owner/name"; anything with more structure than that was meant as a path."""
    return spec.startswith(("/", ".", "~", "file://")) or "\\" in spec or spec.count("/") > 1 or os.path.isabs(spec)


def _wanted_from_s3(relative_path: str) -> bool:
    parts = relative_path.split("/")
    if parts in (["model_index.json"], [GENERATOR_INFO]):
        return True
    return len(parts) == 2 and parts[0] in COMPONENTS and parts[1].endswith(_S3_SUFFIXES)


def _wanted_decoder_file(relative_path: str) -> bool:
    """A tiny decoder is one model folder: its config and safetensors weights."""
    return "/" not in relative_path and relative_path.endswith((".safetensors", ".json"))


def _s3_cache_folder(uri: str, cache_dir: str) -> str:
    """One folder per URI: readable name, plus a hash so that different prefixes with one basename never collide."""
    digest = hashlib.sha256(uri.encode()).hexdigest()[:16]
    name = re.sub(r"[^A-Za-z0-9._-]", "_", uri[len("s3://") :].rsplit("/", 1)[-1])[:64]
    return os.path.join(cache_dir, f"{name}-{digest}")


def _download_s3(uri: str, kind: str, cache_dir: str | None) -> str:
    """Downloads an s3:// model once; later loads reuse the copy (model prefixes are treated as immutable)."""
    uri = "s3://" + uri[len("s3://") :].strip("/")  # s3://b/p/ and s3://b/p are one model, cached once
    local = _s3_cache_folder(uri, os.path.expanduser(cache_dir or default_cache_dir(kind)))
    try:
        return storage.download_prefix(uri, local, _wanted_decoder_file if kind == "decoder" else _wanted_from_s3)
    except storage.StorageError as e:  # nothing (usable) under the prefix
        raise _ERRORS[kind](f"{kind} {uri!r}: {e}") from e
    except OSError as e:  # pyarrow: missing bucket, access denied, unreachable endpoint
        raise storage.StorageError(f"cannot download {kind} {uri!r}: {brief(e)}") from e


def locate(spec: str, kind: str = "teacher", cache_dir: str | None = None) -> str:
    """The local folder a spec names (downloading an s3:// prefix into the cache first), or a teacher's hub id as it
    is (a tiny decoder's too). Built-in teachers made in code have no folder: ask `BUILT_IN` first."""
    error = _ERRORS[kind]
    spec = str(spec)
    packaged = _packaged(kind)
    if spec in packaged:
        if not os.path.isdir(packaged[spec]):
            raise error(f"the packaged {kind} {spec!r} is missing from this installation ({packaged[spec]})")
        return packaged[spec]
    if storage.is_s3(spec):
        return _download_s3(spec, kind, cache_dir)
    local = storage.local_path(spec)
    if os.path.isdir(local):
        return local
    if os.path.exists(local):
        raise error(f"{kind} {spec!r} is a file; expected a diffusers folder (tokenizer/, text_encoder/, unet/, vae/, scheduler/)")
    if _looks_like_path(spec):
        raise error(f"{kind} {spec!r}: no such folder ({os.path.abspath(local)} does not exist)")
    if kind in ("teacher", "decoder"):
        return spec  # a hub id
    names = ", ".join(sorted(packaged)) or "none are registered yet"  # only generators get here: teachers are hub ids
    raise error(f"{kind} {spec!r} is neither a built-in name (built-in: {names}), an s3:// URI, nor an existing folder "
                f"({os.path.abspath(local)} does not exist)")


def check_generator_spec(spec: str) -> None:
    """Fails fast, without loading or downloading anything, on a generator spec that can only have meant a built-in
    name and is not one. Paths are left alone: on a cluster, a folder may exist on the replicas only."""
    if spec in BUILT_IN_GENERATORS or storage.is_s3(spec) or "/" in spec or os.sep in spec:
        return
    locate(spec, "generator")


def _folder_problems(folder: str) -> list[str]:
    """What keeps `folder` from being a safetensors diffusers pipeline folder; [] when nothing does."""
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


def _check_folder(where: str, spec: str, kind: str = "teacher") -> None:
    if os.path.isdir(where):
        problems = _folder_problems(where)
        if problems:
            raise _ERRORS[kind](f"{kind} {spec!r}: {where} is not a diffusers {kind} folder: {'; '.join(problems)}")


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
    freeze(text_encoder, unet, vae)
    return Teacher(tokenizer, text_encoder, unet, vae, scheduler, source=source)


def _hub_error(spec: str, e: BaseException, what: str = "loaded with safetensors weights") -> TeacherNotFoundError:
    from huggingface_hub import constants

    offline = " HF_HUB_OFFLINE is set, so only the local Hugging Face cache was searched." if constants.HF_HUB_OFFLINE else ""
    names = ", ".join(sorted([*BUILT_IN, *PACKAGED_TEACHERS]))
    return TeacherNotFoundError(f"teacher {spec!r} is neither a built-in name ({names}), an existing folder, an s3:// URI, "
                                f"nor a Hugging Face hub id that could be {what} ({brief(e)}).{offline}")


def load_teacher(spec: str, cache_dir: str | None = None, torch_dtype: torch.dtype = torch.float32) -> Teacher:
    """A frozen teacher (eval mode, requires_grad False) from any spec (see the module docstring); also loads an
    exported generator folder, whose components are a teacher's.

    `cache_dir` holds downloaded s3:// teachers (default ~/.cache/dmd_ray/teachers/); hub downloads go to the
    Hugging Face cache as usual. `torch_dtype` applies to the three networks.
    """
    spec = str(spec)
    if spec in BUILT_IN:
        return BUILT_IN[spec]().to(dtype=torch_dtype)
    where = locate(spec, "teacher", cache_dir)
    if not os.path.isdir(where):
        try:
            return _load_components(where, spec, torch_dtype)
        except Exception as e:
            raise _hub_error(spec, e) from e
    _check_folder(where, spec)
    try:
        return _load_components(where, spec, torch_dtype)
    except TeacherNotFoundError:
        raise
    except Exception as e:  # corrupt or mismatched files: say which teacher, keep the cause chained
        raise TeacherNotFoundError(f"teacher {spec!r}: could not load the folder {where}: {brief(e)}") from e


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
            raise ConfigError(f"resolution {resolution} is not a positive multiple of the VAE's scale factor {f}")
        return (self.latent_channels, resolution // f, resolution // f)


def describe_teacher(spec: str, cache_dir: str | None = None) -> TeacherInfo:
    """Reads a teacher's configs (no weights) and checks that it can be loaded: fails fast, before any sampling.

    Local folders are checked for all five components; s3:// teachers are downloaded into the cache (which the
    workers on this machine then reuse); hub ids have their configs fetched and their weights checked (cached, or
    reachable).
    """
    import diffusers

    spec = str(spec)
    if spec in BUILT_IN:
        if spec == "sd15-architecture":  # known without building 1B parameters
            return TeacherInfo(spec, 4, 8, 64, "epsilon")
        t = BUILT_IN[spec]()
        return TeacherInfo(spec, t.unet.config.in_channels, t.vae_scale_factor, t.unet.config.sample_size, t.prediction_type)
    where = locate(spec, "teacher", cache_dir)
    _check_folder(where, spec)
    try:
        unet = diffusers.UNet2DConditionModel.load_config(where, subfolder="unet")
        vae = diffusers.AutoencoderKL.load_config(where, subfolder="vae")
        scheduler = diffusers.DDIMScheduler.load_config(where, subfolder="scheduler")
    except Exception as e:
        raise _hub_error(spec, e, "reached") from e
    if not os.path.isdir(where):
        from dmd_ray.sd.weights import check_hub_weights

        check_hub_weights(where)
    sample_size = unet.get("sample_size", 64)
    sample_size = sample_size if isinstance(sample_size, int) else sample_size[0]
    prediction_type = scheduler.get("prediction_type", "epsilon")
    check_prediction_type(prediction_type)
    return TeacherInfo(spec, int(unet["in_channels"]), 2 ** (len(vae["block_out_channels"]) - 1), int(sample_size), prediction_type)


def unet_config(spec: str, cache_dir: str | None = None) -> dict:
    """The UNet config of a teacher or an exported generator's folder (a built-in architecture is built for it on
    the meta device: the config without a billion random weights)."""
    import diffusers

    spec = str(spec)
    if spec in BUILT_IN:
        with torch.device("meta"):
            return dict(BUILT_IN[spec]().unet.config)
    return dict(diffusers.UNet2DConditionModel.load_config(locate(spec, "teacher", cache_dir), subfolder="unet"))


def resolve_generator(spec: str, cache_dir: str | None = None) -> str:
    """The local folder of the exported generator named by `spec`: a built-in name, an s3:// prefix
    (downloaded once into `cache_dir`, safetensors and configs only) or a local folder."""
    folder = locate(spec, "generator", cache_dir)
    if not os.path.isfile(os.path.join(folder, GENERATOR_INFO)):
        raise GeneratorNotFoundError(
            f"generator {spec!r}: {folder} has no {GENERATOR_INFO}, so it is not an exported one-step generator "
            "(dmd_ray.sd.export.export_generator writes one); a multi-step teacher would give noise in one step"
        )
    return folder


def load_tiny_decoder(spec: str, cache_dir: str | None = None, torch_dtype: torch.dtype = torch.float32):
    """A tiny latent decoder (diffusers AutoencoderTiny: TAESD's architecture) from a packaged name (demo-tiny), a
    folder, an s3:// prefix or a hub id (madebyollin/taesd for SD 1.x/2.x latents, madebyollin/taesdxl for SDXL's);
    frozen, safetensors weights only. It decodes the latents the UNet sees (its scaling factor is 1)."""
    from diffusers import AutoencoderTiny

    where = locate(spec, "decoder", cache_dir)
    try:
        decoder = AutoencoderTiny.from_pretrained(where, torch_dtype=torch_dtype, use_safetensors=True)
    except Exception as e:
        from huggingface_hub import constants

        offline = " HF_HUB_OFFLINE is set, so only the local Hugging Face cache was searched." if constants.HF_HUB_OFFLINE else ""
        raise DecoderNotFoundError(f"tiny decoder {spec!r}: could not load an AutoencoderTiny with safetensors weights from "
                                   f"{where} (packaged: {', '.join(PACKAGED_DECODERS)}) ({brief(e)}).{offline}") from e
    freeze(decoder)
    return decoder


def check_tiny_decoder(decoder, latent_channels: int, vae_scale_factor: int, spec: str = "") -> None:
    """Refuses a tiny decoder that cannot decode this model's latents (channels, or upsampling factor)."""
    cfg = decoder.config
    scale = int(cfg.upsampling_scaling_factor) ** (len(cfg.decoder_block_out_channels) - 1)
    if cfg.latent_channels != latent_channels or scale != vae_scale_factor:
        raise ConfigError(f"tiny decoder {spec!r} decodes {cfg.latent_channels}-channel latents upsampled {scale}x; this model's are "
                          f"{latent_channels}-channel, upsampled {vae_scale_factor}x by its VAE")


def read_generator_info(folder: str) -> dict:
    with open(os.path.join(folder, GENERATOR_INFO)) as f:
        info = json.load(f)
    if info.get("format") != GENERATOR_FORMAT:
        raise GeneratorNotFoundError(f"{folder}/{GENERATOR_INFO} has format {info.get('format')!r}; expected {GENERATOR_FORMAT!r}")
    return info
