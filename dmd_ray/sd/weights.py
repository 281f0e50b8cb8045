"""Weights a run would download: are they cached here, or reachable? Asked on the driver, before any work starts,
so that a machine without internet fails in a second with the fix, not inside a worker after pair generation.
"""
from __future__ import annotations

import os
import urllib.error
import urllib.request

from dmd_ray.typed_config import ConfigError

# The torchvision ImageNet backbones that lpips.LPIPS(net=..., pnet_rand=False) loads.
LPIPS_BACKBONES = {"vgg": "VGG16_Weights", "alex": "AlexNet_Weights", "squeeze": "SqueezeNet1_1_Weights"}
REACH_TIMEOUT_S = 5.0


def reachable(url: str, timeout: float = REACH_TIMEOUT_S) -> bool:
    """Whether a HEAD request for `url` gets any HTTP answer within `timeout` seconds."""
    try:
        urllib.request.urlopen(urllib.request.Request(url, method="HEAD"), timeout=timeout).close()
        return True
    except urllib.error.HTTPError:
        return True  # the server answered
    except (urllib.error.URLError, OSError):
        return False


def lpips_backbone_file(backbone: str) -> tuple[str, str]:
    """(URL, local cache path) of an LPIPS backbone's torchvision weights."""
    import torch
    import torchvision

    if backbone not in LPIPS_BACKBONES:
        raise ConfigError(f"lpips_backbone must be one of {sorted(LPIPS_BACKBONES)}, got {backbone!r}")
    url = getattr(torchvision.models, LPIPS_BACKBONES[backbone]).IMAGENET1K_V1.url
    return url, os.path.join(torch.hub.get_dir(), "checkpoints", os.path.basename(url))


def check_lpips_backbone(backbone: str) -> None:
    """Raises ConfigError, naming both fixes, when the pretrained LPIPS backbone is neither cached nor reachable."""
    url, path = lpips_backbone_file(backbone)
    if os.path.exists(path) or reachable(url):
        return
    raise ConfigError(
        f"the LPIPS {backbone} backbone's ImageNet weights are not cached at {path} and {url} cannot be reached from "
        f"this machine. Either run with --lpips-pretrained-backbone false (a random backbone under LPIPS's calibrated "
        f"heads, which ship with the lpips package), or download that file on a machine with internet and put it at "
        f"{path} (on every node of a cluster; TORCH_HOME moves the folder)"
    )


def check_hub_weights(repo: str) -> None:
    """Raises ConfigError when a hub teacher's safetensors weights are neither in the local Hugging Face cache nor
    reachable on the hub."""
    from huggingface_hub import constants, file_exists, try_to_load_from_cache

    files = ("unet/diffusion_pytorch_model.safetensors", "vae/diffusion_pytorch_model.safetensors", "text_encoder/model.safetensors")
    missing = [f for f in files if not isinstance(try_to_load_from_cache(repo, f), str)]
    if not missing:
        return
    problem = None
    if constants.HF_HUB_OFFLINE:
        problem = "HF_HUB_OFFLINE is set"
    else:
        try:
            absent = [f for f in missing if not file_exists(repo, f)]
        except Exception as e:  # no network, DNS, proxy, auth: the hub cannot be asked
            problem = f"the hub cannot be reached ({type(e).__name__})"
        else:
            if absent:
                raise ConfigError(f"teacher {repo!r} on the hub has no {', '.join(absent)}: only safetensors weights are loaded")
    if problem:
        raise ConfigError(
            f"teacher {repo!r}: {', '.join(missing)} are not in the local Hugging Face cache ({constants.HF_HUB_CACHE}) and "
            f"{problem}. Download the teacher on a machine with internet (huggingface-cli download {repo}) and copy the "
            "cache here (HF_HOME), or pass a local folder or s3:// copy of it as --teacher"
        )
