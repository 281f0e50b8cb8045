"""Image helpers: tensors in [-1, 1] to uint8, grids, encoded bytes (PNG, JPEG, WebP)."""
from __future__ import annotations

import io

import numpy as np
import torch


def to_uint8_tensor(images: torch.Tensor) -> torch.Tensor:
    """[B, 3, H, W] in [-1, 1] -> [B, 3, H, W] uint8, on the same device."""
    return ((images.detach().float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)


def to_uint8(images: torch.Tensor) -> np.ndarray:
    """[B, 3, H, W] in [-1, 1] -> [B, H, W, 3] uint8."""
    return to_uint8_tensor(images).permute(0, 2, 3, 1).cpu().numpy()


def grid(images: np.ndarray, columns: int) -> np.ndarray:
    """Tiles [B, H, W, 3] uint8 images into rows of `columns` (missing cells stay black)."""
    b, h, w, c = images.shape
    rows = -(-b // columns)
    out = np.zeros((rows * h, columns * w, c), dtype=np.uint8)
    for i, img in enumerate(images):
        r, col = divmod(i, columns)
        out[r * h : (r + 1) * h, col * w : (col + 1) * w] = img
    return out


def png_bytes(image: np.ndarray, min_size: int = 0, compress_level: int = 1) -> bytes:
    """PNG of an [H, W, 3] uint8 array; upscaled (nearest) so its short side is at least `min_size`. Level 1
    compresses a 512x512 image several times faster than PIL's default 6, for files about 10-20% larger: on a GPU
    replica, encoding is a visible share of a request."""
    from PIL import Image

    img = Image.fromarray(image)
    if min_size and min(img.size) < min_size:
        scale = -(-min_size // min(img.size))
        img = img.resize((img.size[0] * scale, img.size[1] * scale), Image.NEAREST)
    buf = io.BytesIO()
    img.save(buf, format="PNG", compress_level=compress_level)
    return buf.getvalue()


MEDIA_TYPES = {"png": "image/png", "jpeg": "image/jpeg", "webp": "image/webp"}


def encode_image(image: np.ndarray, output_format: str = "png", quality: int = 100) -> bytes:
    """[H, W, 3] uint8 as PNG (lossless, zlib level 1: see png_bytes), JPEG or WebP at `quality` (0-100; 100 is the
    best; WebP at 100 is still lossy). WebP uses libwebp's fastest method: encoding time is what a one-step model's
    latency is made of."""
    if output_format == "png":
        return png_bytes(image)
    from PIL import Image

    if output_format not in MEDIA_TYPES:
        raise ValueError(f"output format {output_format!r} is not one of {', '.join(MEDIA_TYPES)}")
    buf = io.BytesIO()
    if output_format == "jpeg":
        Image.fromarray(image).save(buf, format="JPEG", quality=int(quality))
    else:
        Image.fromarray(image).save(buf, format="WEBP", quality=int(quality), method=0)
    return buf.getvalue()
