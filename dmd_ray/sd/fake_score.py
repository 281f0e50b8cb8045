"""The fake score's weights from one run to the next, so that DMD continues where a run stopped.

A run writes `<output>/fake_score.safetensors` beside its export: the fake score's UNet (`unet.*`) and, with the GAN
term, its classifier head (`classifier.*`; the header's metadata names the features it reads). A later run given
`--init-generator <that export>` and `--init-fake-score <that file>` starts both networks where the first one
stopped, on another machine if need be (the demo's pair is about 15 MB in float16: small enough to carry between GPU
jobs). Optimiser moments and the step count start afresh, under the new run's warm-up. DMD needs the fake score to
track the generator's distribution: restarting it from the teacher would cost the generator its first few hundred
steps' worth of a lagging fake score.
"""
from __future__ import annotations

import json

import torch
from torch import Tensor, nn

from dmd_ray.data import storage
from dmd_ray.typed_config import ConfigError

FILE = "fake_score.safetensors"


def save_fake_score(state: dict[str, Tensor], uri: str, dtype: torch.dtype, gan_features: str = "") -> int:
    """Writes the fake score's state dict (keys as the engine's module names them) in `dtype`, and which features its
    GAN head reads (`gan_features`, where it has one); returns its bytes."""
    from safetensors.torch import save

    metadata = {"gan_features": gan_features} if gan_features else None
    data = save({k: v.detach().to("cpu", dtype).contiguous() for k, v in state.items()}, metadata=metadata)
    storage.write_bytes(uri, data)
    return len(data)


def read_header(uri: str) -> dict:
    """A safetensors file's JSON header (each tensor's dtype and shape, and `__metadata__`), without reading the
    weights (local or s3://)."""
    fs, path = storage.resolve(uri)
    try:
        with fs.open_input_file(path) as f:
            size = int.from_bytes(f.read(8), "little")
            if not 0 < size < 2**27:
                raise ConfigError(f"init_fake_score {uri!r} is not a safetensors file")
            header = json.loads(f.read(size))
    except (FileNotFoundError, OSError) as e:
        raise ConfigError(f"init_fake_score {uri!r} cannot be read: {e}") from e
    except ValueError as e:  # a header that is not JSON
        raise ConfigError(f"init_fake_score {uri!r} is not a safetensors file ({e})") from e
    return header


def read_shapes(uri: str) -> dict[str, list[int]]:
    """Each tensor's shape, from the file's header."""
    return {k: v["shape"] for k, v in read_header(uri).items() if k != "__metadata__"}


def check_fake_score(uri: str, unet_shapes: dict[str, list[int]]) -> None:
    """Refuses a file whose UNet is not the teacher's architecture, naming the first differences."""
    theirs = {k.removeprefix("unet."): v for k, v in read_shapes(uri).items() if k.startswith("unet.")}
    missing, extra = sorted(set(unet_shapes) - set(theirs)), sorted(set(theirs) - set(unet_shapes))
    different = [f"{k}: {theirs[k]} there, {list(v)} here" for k, v in unet_shapes.items() if k in theirs and list(theirs[k]) != list(v)]
    if missing or extra or different:
        raise ConfigError(f"init_fake_score {uri!r} holds another UNet than the teacher's: {len(missing)} weights missing "
                          f"{missing[:3]}, {len(extra)} unexpected {extra[:3]}, {len(different)} of other shapes {different[:3]}")


def load_fake_score(model: nn.Module, uri: str) -> str:
    """Loads the file into `model` (a UNetDenoiser): the UNet exactly; the classifier head when both have one and it
    read the same features (a run that adds the GAN term, or moves it to other features, starts a fresh head).
    Returns what was loaded, for the log."""
    from safetensors.torch import load

    state = load(storage.read_bytes(uri))
    unet = {k.removeprefix("unet."): v for k, v in state.items() if k.startswith("unet.")}
    model.unet.load_state_dict(unet, strict=True)
    head = {k.removeprefix("classifier."): v for k, v in state.items() if k.startswith("classifier.")}
    if not head:
        return "UNet"
    if getattr(model, "classifier", None) is None:
        return "UNet (its GAN head left out: this run has none)"
    theirs = (read_header(uri).get("__metadata__") or {}).get("gan_features", "bottleneck")  # older files: bottleneck
    if theirs != model.classifier.features:
        return f"UNet (its GAN head, on {theirs} features, left out: this run's reads {model.classifier.features})"
    model.classifier.load_state_dict(head, strict=True)
    return "UNet and GAN head"
