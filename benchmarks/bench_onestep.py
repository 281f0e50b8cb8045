"""The service's one-step generator (sd/one_step.py: OneStepImageGenerator) without HTTP: latency at batch 1 and
throughput at a larger batch, eager against compiled (CUDA graphs), with the generator's VAE and with a tiny
decoder, in one run; plus JPEG encoding of the batch on the device (nvJPEG) and PNG on the CPU.

    python benchmarks/bench_onestep.py --model tiny --modes eager,default          # CPU check, 32x32
    python benchmarks/bench_onestep.py --model sd15-architecture --batch 16        # GPU: SD1.5, 512x512, fp16
    python benchmarks/bench_onestep.py --model sd15-architecture --dtype float16,bfloat16   # GPU: fp16 against bf16
    python benchmarks/bench_onestep.py --model sd15-architecture --tiny-decoder "" --cudnn-benchmark false,true  # cuDNN autotuning
    python benchmarks/bench_onestep.py --model demo --tiny-decoder "" --shapes static,dynamic --batch 8  # compile time

`--model`: a generator spec, or "tiny" / "sd15-architecture" (that architecture with random weights, exported
first: speed does not depend on the weights). `--tiny-decoder`: a decoder spec (demo-tiny, a folder, s3://, hub
id), or "random" for TAESD's published layout with random weights (what SD users load as madebyollin/taesd).
Times are of `generate(..., on_device=True)` up to uint8 images on the device, synchronised, median of `--iters`
calls after warm-up; compile time is the warm-up's (the service's: every power-of-two batch up to --batch). Each row
is written to --json as it ends.
"""
from __future__ import annotations

import argparse
import datetime
import itertools
import json
import os
import statistics
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402

from benchmarks.bench_serve import export_architecture  # noqa: E402
from benchmarks.common import device_name, synchronize  # noqa: E402


def timed(fn, iters: int, device) -> float:
    """Median seconds of `iters` synchronised calls."""
    times = []
    for _ in range(iters):
        started = time.perf_counter()
        fn()
        synchronize(device)
        times.append(time.perf_counter() - started)
    return statistics.median(times)


def random_tiny_decoder(folder: str) -> str:
    from diffusers import AutoencoderTiny

    AutoencoderTiny().save_pretrained(folder)  # diffusers' defaults are TAESD's layout (4 latent channels, x8)
    return folder


def measure(folder: str, device, dtype: str, decoder: str, mode: str, shapes: str, batch: int, iters: int, cudnn_benchmark: bool = False,
            tuned: bool = False, profile: bool = False, skip_guards: bool = True) -> dict:
    from torch._dynamo.utils import counters

    from dmd_ray.images import encode_image
    from dmd_ray.sd.one_step import GenerationJob, OneStepImageGenerator

    # cuDNN's autotuner picks each convolution's fastest algorithm per shape when first run (here: in the warm-up,
    # before the CUDA graphs are recorded); a process-wide switch, so set per row and put back after it
    benchmark_before, torch.backends.cudnn.benchmark = torch.backends.cudnn.benchmark, cudnn_benchmark
    graphs_before = counters["stats"]["unique_graphs"]
    generator = OneStepImageGenerator(folder, device, dtype, decoder=decoder, compile_mode="" if mode == "eager" else mode,
                                      static_shapes=shapes == "static", tuned=tuned, skip_guards=skip_guards)
    size = generator.native_size
    one = [GenerationJob("a small red circle on a blue background", (0,), size)]
    many = [GenerationJob("a large green square", tuple(range(batch)), size)]
    started = time.perf_counter()
    generator.warmup(batch, [size])  # what a replica pays before serving: every power-of-two batch up to `batch`
    for jobs in (one, many):  # the graphs of the timed calls (one distinct prompt) on top
        generator.generate(jobs, on_device=True)
    synchronize(device)
    warmup_s = time.perf_counter() - started
    graphs = counters["stats"]["unique_graphs"] - graphs_before  # Dynamo graphs compiled, all networks
    generator.latents(one)  # CUDA graph trees record the path that stops before the decoder once
    latents_ms = 1e3 * timed(lambda: generator.latents(one), iters, device)  # text encoder + UNet, batch 1
    latency = timed(lambda: generator.generate(one, on_device=True), iters, device)
    batch_s = timed(lambda: generator.generate(many, on_device=True), iters, device)
    row = {"decoder": decoder or "vae", "mode": mode, "shapes": "-" if mode == "eager" else shapes, "dtype": str(generator.dtype).removeprefix("torch."),
           "cudnn_benchmark": cudnn_benchmark, "tuned": tuned, "skip_guards": skip_guards, "size": str(size), "batch": batch, "warmup_s": warmup_s, "graphs": graphs,
           "latency_ms": latency * 1e3, "latents_ms": latents_ms, "images_per_s": batch / batch_s}
    if profile:  # GPU time per batch-1 call against its wall time, and the kernels that take it
        from dmd_ray.distributed.profiling import profile_iterations

        row["profile"] = profile_iterations(lambda n: [generator.generate(one, on_device=True) for _ in range(n)], 5, torch.device(device))
        print(json.dumps(row["profile"]), flush=True)
    images = generator.generate(many, on_device=True)[0]
    if images.device.type == "cuda":
        from torchvision.io import encode_jpeg

        row["nvjpeg_ms_per_image"] = 1e3 * timed(lambda: encode_jpeg(list(images), quality=90), 5, device) / batch
    first = images[0].permute(1, 2, 0).cpu().numpy()
    row["png_cpu_ms"] = 1e3 * timed(lambda: encode_image(first, "png"), 3, "cpu")
    row["jpeg_cpu_ms"] = 1e3 * timed(lambda: encode_image(first, "jpeg", 90), 3, "cpu")
    del generator
    torch.compiler.reset()
    torch.backends.cudnn.benchmark = benchmark_before
    return row


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="tiny")
    p.add_argument("--tiny-decoder", default="random", help='a tiny decoder spec, "random" (TAESD layout), or "" to skip')
    p.add_argument("--modes", default="eager,reduce-overhead", help="eager, and torch.compile modes")
    p.add_argument("--shapes", default="dynamic", help="compiled rows: dynamic (the service's: batch 1, then one compile for any batch), "
                   "static (a compile per power-of-two batch); comma-separated: rows for each")
    p.add_argument("--batch", type=int, default=16, help="the throughput batch, and the largest batch the warm-up compiles")
    p.add_argument("--iters", type=int, default=20)
    p.add_argument("--dtype", default="auto", help="auto (fp16 on GPU), float16, bfloat16, float32; comma-separated: rows for each")
    p.add_argument("--cudnn-benchmark", default="false", help="torch.backends.cudnn.benchmark: false, true; comma-separated: rows for each")
    p.add_argument("--tuned", default="false", help="the generator's `tuned` (channels-last, fused attention projections, 1x1 "
                   "convolutions as matmuls): false, true; comma-separated: rows for each")
    p.add_argument("--skip-guards", default="true", help="the generator's `skip_guards` after the warm-up: false, true; comma-separated: "
                   "rows for each (compiled rows only)")
    p.add_argument("--profile", action="store_true", help="torch.profiler over 5 batch-1 calls per row: GPU time, launches, top kernels")
    p.add_argument("--json", help="rows are written here as they end")
    args = p.parse_args()
    for name in ("cudnn_benchmark", "tuned", "skip_guards"):
        if not set(getattr(args, name).split(",")) <= {"false", "true"}:
            p.error(f"--{name.replace('_', '-')} takes false and true, got {getattr(args, name)}")
    device = "cuda" if torch.cuda.is_available() else "cpu"
    rows = []
    with tempfile.TemporaryDirectory(prefix="bench-onestep-") as tmp:
        from dmd_ray.sd.resolve import resolve_generator

        if args.model in ("tiny", "sd15-architecture"):
            folder = export_architecture(args.model, os.path.join(tmp, args.model))
        else:
            folder = resolve_generator(args.model)
        decoders = [""]
        if args.tiny_decoder:
            decoders.append(random_tiny_decoder(os.path.join(tmp, "taesd")) if args.tiny_decoder == "random" else args.tiny_decoder)
        benchmark_settings = [v == "true" for v in args.cudnn_benchmark.split(",")]
        tuned_settings = [v == "true" for v in args.tuned.split(",")]
        guard_settings = [v == "true" for v in args.skip_guards.split(",")]
        for dtype, decoder, cudnn_benchmark, tuned, mode, shapes, skip_guards in itertools.product(
                args.dtype.split(","), decoders, benchmark_settings, tuned_settings, args.modes.split(","), args.shapes.split(","), guard_settings):
            if mode == "eager" and (shapes != args.shapes.split(",")[0] or skip_guards != guard_settings[0]):
                continue  # eager has no shapes to choose and no guards to check
            row = measure(folder, device, dtype, decoder, mode, shapes, args.batch, args.iters, cudnn_benchmark, tuned, args.profile, skip_guards)
            row["decoder"] = "tiny (TAESD layout)" if decoder and args.tiny_decoder == "random" else row["decoder"]
            rows.append(row)
            print(json.dumps(row), flush=True)
            if args.json:
                with open(args.json, "w") as f:
                    json.dump({"device": device_name(device), "torch": torch.__version__, "model": args.model, "dtype": args.dtype,
                               "date": str(datetime.date.today()), "rows": rows}, f, indent=1)
    print(f"\n{device_name(device)}, {args.model}, dtype {args.dtype}, {datetime.date.today()}")
    print(f"| dtype | decoder | cuDNN autotune | tuned | mode | shapes | skip guards | batch-1 latency ms | of which text + UNet ms | images/s at batch {args.batch} | "
          "warm-up (compile) s | graphs | nvJPEG ms/image | PNG CPU ms | JPEG CPU ms |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['dtype']} | {r['decoder']} | {r['cudnn_benchmark']} | {r['tuned']} | {r['mode']} | {r['shapes']} | {r['skip_guards'] if r['mode'] != 'eager' else '-'} | {r['latency_ms']:.2f} | {r['latents_ms']:.2f} | "
              f"{r['images_per_s']:.1f} | {r['warmup_s']:.1f} | {r['graphs']} | "
              f"{r.get('nvjpeg_ms_per_image', float('nan')):.2f} | {r['png_cpu_ms']:.1f} | {r['jpeg_cpu_ms']:.1f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
