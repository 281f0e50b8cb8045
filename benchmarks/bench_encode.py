"""Image encoding for the service: ms per 512x512 image by output format, and a batch through its ImageEncoder.

    python benchmarks/bench_encode.py --size 512 --batch 8 --threads 1,2,4

Images: rendered shapes scenes at the size, with mild noise (flat synthetic images would flatter PNG). Rows: the
format (PNG at zlib level 1 as served, JPEG and WebP at quality 90), one image encoded alone (median of --repeats),
and a batch of --batch images through serve.app.ImageEncoder with each thread count (what a request of n images, or
a replica's concurrent requests, costs). nvJPEG (GPU replicas) is measured by bench_serve.py on a GPU.
"""
from __future__ import annotations

import argparse
import asyncio
import os
import random
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import numpy as np  # noqa: E402
import torch  # noqa: E402

from dmd_ray.demos import shapes  # noqa: E402
from dmd_ray.images import encode_image, to_uint8  # noqa: E402


def images(n: int, size: int) -> np.ndarray:
    scenes = shapes.random_scenes(n, random.Random(0))
    rendered = shapes.render(scenes, seed=0, resolution=size)
    return to_uint8(rendered + 0.03 * torch.randn(rendered.shape, generator=torch.Generator().manual_seed(0)))


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--size", type=int, default=512)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--threads", default="1,2,4")
    p.add_argument("--repeats", type=int, default=9)
    args = p.parse_args(argv)
    from serve.app import ImageEncoder

    batch = images(args.batch, args.size)
    threads = [int(t) for t in args.threads.split(",")]
    print(f"{args.size}x{args.size}, batch {args.batch}, {os.cpu_count()} CPUs, {time.strftime('%Y-%m-%d')}")
    print(f"{'format':<8}{'KiB':>7}{'ms/image':>10}" + "".join(f"{f'batch, {t} thr':>15}" for t in threads))
    for output_format in ("png", "jpeg", "webp"):
        size_kib = len(encode_image(batch[0], output_format, 90)) / 1024
        alone = []
        for i in range(args.repeats):
            start = time.perf_counter()
            encode_image(batch[i % len(batch)], output_format, 90)
            alone.append(time.perf_counter() - start)
        row = f"{output_format:<8}{size_kib:>7.0f}{1000 * statistics.median(alone):>10.1f}"
        for t in threads:
            encoder = ImageEncoder(t)
            asyncio.run(encoder.encode(batch, output_format, 90))  # the pool's threads started
            start = time.perf_counter()
            asyncio.run(encoder.encode(batch, output_format, 90))
            row += f"{1000 * (time.perf_counter() - start):>12.1f} ms"
        print(row)


if __name__ == "__main__":
    main()
