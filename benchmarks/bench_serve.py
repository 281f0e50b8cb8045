"""Serving overhead: the one-step generator through Ray Serve over HTTP against the same batched generator called
directly, in one run, at several client concurrencies: requests/s, p50 and p99 latency.

    python benchmarks/bench_serve.py --model tiny                                  # CPU: tiny export, 32x32
    python benchmarks/bench_serve.py --model demo                                  # a built-in generator
    python benchmarks/bench_serve.py --model sd15-architecture --concurrency 1,8,32 --output-format jpeg,png,webp   # GPU

`--model` is a generator spec (built-in name, folder, s3://), or "tiny" / "sd15-architecture": that architecture
with random weights (speed does not depend on them), exported into a temporary folder first.

"bare" is `serve.app.BatchedGenerator` (the replica's @serve.batch batching, same max batch size and wait) driven by
coroutines in this process: generation set up as the service sets it up (`--compile`, `--decoder`, the warm-up in
the generation thread), encoding in each `--output-format` (nvJPEG on a GPU for JPEG) and base64, no HTTP. "http" is the service from
`serve.app.build_app` (one replica) driven by an aiohttp client posting to /v1/images/generations. Each client
sends its next request when the previous one is answered (closed loop); every request has its own seed. The
replica starts with empty compile caches, as on a fresh node, and warms up beside the bare path's warm-up (a GPU
replica's compilation takes minutes); each path's rows are measured with the other idle. `--paths bare` or `http`
measures one. "outside the handler" is an HTTP request's latency minus the replica handler's own time (its
Server-Timing header): what Serve's proxy, Ray's hops and FastAPI's parsing and JSON add. `--max-batches-in-flight
0,2` measures the bare path at each bound on the batches a GPU replica queues (the service's max_batches_in_flight) in
one process, and the HTTP path at the last one.
"""
from __future__ import annotations

import argparse
import asyncio
import base64
import concurrent.futures
import datetime
import itertools
import json
import os
import platform
import socket
import statistics
import sys
import tempfile
import time
import types

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import numpy as np  # noqa: E402
import torch  # noqa: E402

PROMPTS = ["a small red circle on a blue background", "a large green square", "the yellow triangle at the top",
           "two purple stars on a white background"]


def export_architecture(name: str, folder: str) -> str:
    from dmd_ray.sd.architectures import BUILT_IN
    from dmd_ray.sd.export import export_generator

    teacher = BUILT_IN[name]()
    return export_generator(teacher, teacher.unet, folder, timestep=teacher.scheduler.config.num_train_timesteps - 1,
                            metadata={"note": f"{name} with random weights, for benchmarks"})


def percentile_ms(latencies: list[float], q: float) -> float:
    return float(np.percentile(np.asarray(latencies) * 1e3, q))


async def closed_loop(send, concurrency: int, seconds: float, warmup_per_client: int) -> dict:
    """`concurrency` clients, each sending its next request when the previous one is answered. Measuring starts
    once every client has sent `warmup_per_client` unmeasured requests, and stops after `seconds` (requests in
    flight then are completed and counted). `send(seed)` performs one request; where it returns the replica's
    Server-Timing ({phase: ms}, with "handler"), the row also has each phase's p50 and the p50 of the rest of each
    request's latency (outside the handler)."""
    seeds = itertools.count()
    latencies: list[float] = []
    server: dict[str, list[float]] = {}
    everyone_warm = asyncio.Event()
    warm_clients = 0
    started = deadline = 0.0

    async def client() -> None:
        nonlocal warm_clients, started, deadline
        for _ in range(warmup_per_client):
            await send(next(seeds))
        warm_clients += 1
        if warm_clients == concurrency:
            started = time.perf_counter()
            deadline = started + seconds
            everyone_warm.set()
        await everyone_warm.wait()
        while time.perf_counter() < deadline:
            request_started = time.perf_counter()
            timing = await send(next(seeds))
            latencies.append(time.perf_counter() - request_started)
            if timing:
                for phase, ms in {**timing, "outside the handler": latencies[-1] * 1e3 - timing["handler"]}.items():
                    server.setdefault(phase, []).append(ms / 1e3)

    await asyncio.gather(*(client() for _ in range(concurrency)))
    wall = time.perf_counter() - started
    return {"concurrency": concurrency, "requests": len(latencies), "req_per_s": len(latencies) / wall,
            "p50_ms": percentile_ms(latencies, 50), "p99_ms": percentile_ms(latencies, 99),
            **({"server_p50_ms": {phase: percentile_ms(seconds, 50) for phase, seconds in server.items()}} if server else {})}


def report(path: str, row: dict) -> None:
    size = f"  response {row['response_kib']:.0f} KiB" if "response_kib" in row else ""
    outside = "  p50 ms: " + ", ".join(f"{phase} {ms:.1f}" for phase, ms in row["server_p50_ms"].items()) if "server_p50_ms" in row else ""
    in_flight = f" in flight {row['max_batches_in_flight']}" if "max_batches_in_flight" in row else ""
    print(f"{path:5}{in_flight} c={row['concurrency']:<3} {row['req_per_s']:8.1f} req/s  p50 {row['p50_ms']:7.1f} ms  "
          f"p99 {row['p99_ms']:7.1f} ms  mean batch {row['mean_batch']:.1f}{size}{outside}", flush=True)


def outside_serve_replica(max_ongoing_requests: int) -> None:
    """@serve.batch reads the replica's max_ongoing_requests once, for a warning; outside a replica, hand it the
    service's value so that the very same batching code runs here."""
    from ray import serve

    config = types.SimpleNamespace(max_ongoing_requests=max_ongoing_requests)
    serve.get_replica_context = lambda: types.SimpleNamespace(_deployment_config=config)


async def run_bare(folder: str, device: str, args, config, concurrencies: list[int], formats: list[str], rows: dict, save,
                   in_flight_values: list[int], replica_started=None) -> None:
    """Fills `rows` with the bare rows per output format (each concurrency at each bound on the batches in flight) and
    "warmup_s", the generator's warm-up (compilation) time, calling `save()` after each. With `replica_started` (a
    future), the rows wait for it after the warm-up, so that no row shares the machine with the replica's warm-up."""
    from dmd_ray.sd.one_step import SEED_MODULUS, GenerationJob, ImageSize, OneStepImageGenerator
    from serve.app import BatchedGenerator, ImageEncoder, ServerTiming

    # as the service sets them up: its compile mode and decoder, the warm-up in the batcher's generation thread
    generator = OneStepImageGenerator(folder, device, config.dtype, config.decoder, compile_mode=config.compile_mode(device))
    size = ImageSize.parse(args.size) if args.size else generator.native_size
    batcher = BatchedGenerator(generator, config.max_batch_size, config.batch_wait_timeout_s, on_device=device == "cuda")
    started = time.perf_counter()
    batcher.thread.submit(generator.warmup, config.max_batch_size, [size]).result()
    warmup_s = time.perf_counter() - started
    print(f"bare: warm-up {warmup_s:.1f} s (compile: {generator.compile_mode or 'off'})", flush=True)
    encoder = ImageEncoder(config.encode_threads or max(2, int(config.num_cpus)))

    rows["warmup_s"] = warmup_s
    save()
    if replica_started is not None:
        await asyncio.wrap_future(replica_started)
    for output_format in formats:

        async def send(seed: int) -> dict[str, float]:
            timing = ServerTiming(time.perf_counter())  # the phases the replica's handler reports, timed the same way
            job = GenerationJob(PROMPTS[seed % len(PROMPTS)], (seed % SEED_MODULUS,), size)
            images = await batcher.generate(job)
            timing.mark("generate")
            encoded = await encoder.encode(images, output_format, 90)
            timing.mark("encode")
            for image in encoded:
                base64.b64encode(image)  # as the service encodes its response (after its last phase)
            return timing.durations_ms()

        rows[output_format] = []
        for in_flight, c in itertools.product(in_flight_values, concurrencies):
            batcher.max_batches_in_flight = in_flight
            before = (batcher.batches_run, batcher.images_generated)
            rows[output_format].append(await closed_loop(send, c, args.seconds, args.warmup_requests))
            rows[output_format][-1].update(mean_batch=(batcher.images_generated - before[1]) / max(1, batcher.batches_run - before[0]),
                                           max_batches_in_flight=in_flight)
            report(f"bare {output_format}", rows[output_format][-1])
            save()
    del batcher, generator
    if device == "cuda":
        torch.cuda.empty_cache()


async def run_http(url: str, args, concurrencies: list[int], formats: list[str], rows: dict, floor: list, save) -> None:
    """Fills `rows` with the HTTP rows per output format and `floor` with Serve's floor (GET /health, nothing computed,
    with 1 and with the most clients), calling `save()` after each row."""
    import aiohttp

    from serve.app import ServerTiming

    connector = aiohttp.TCPConnector(limit=max(concurrencies))
    async with aiohttp.ClientSession(connector=connector, timeout=aiohttp.ClientTimeout(total=120)) as session:

        async def post(seed: int, output_format: str) -> None:
            body = {"prompt": PROMPTS[seed % len(PROMPTS)], "seed": seed, "response_format": "b64_json",
                    "output_format": output_format, "output_compression": 90}
            if args.size:
                body["size"] = args.size
            async with session.post(f"{url}/v1/images/generations", json=body) as response:
                response_bytes.append(len(await response.read()))
                if response.status != 200:
                    raise RuntimeError(f"HTTP {response.status}: {(await response.text())[:300]}")
                return ServerTiming.parse(response.headers["Server-Timing"])

        async def batch_counts() -> tuple[int, float]:
            async with session.get(f"{url}/health") as response:
                health = await response.json()
            return health["batches"], health["batches"] * health["mean_batch_images"]

        for output_format in formats:
            rows[output_format] = []
            for c in concurrencies:
                response_bytes: list[int] = []  # the JSON bodies' sizes (the base64 images), warm-up requests included
                before = await batch_counts()
                rows[output_format].append(await closed_loop(lambda seed: post(seed, output_format), c, args.seconds, args.warmup_requests))
                after = await batch_counts()
                rows[output_format][-1]["mean_batch"] = (after[1] - before[1]) / max(1, after[0] - before[0])
                rows[output_format][-1]["response_kib"] = statistics.median(response_bytes) / 1024
                report(f"http {output_format}", rows[output_format][-1])
                save()

        async def health(_seed: int) -> None:
            async with session.get(f"{url}/health") as response:
                await response.read()

        # Serve's own cost: the same path with nothing to compute (the replica answers GET /health at once)
        for c in (1, max(concurrencies)):
            floor.append(await closed_loop(health, c, args.seconds / 2, args.warmup_requests))
            save()


def start_service(folder: str, service_args: dict) -> tuple[str, float]:
    """Deploys the service with one replica on a free port; its URL and the seconds until it served (load, warm-up)."""
    import ray
    from ray import serve

    from serve.app import build_app

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    started = time.perf_counter()
    serve.run(build_app({**service_args, "model": folder}), name="bench", route_prefix="/")
    seconds = time.perf_counter() - started
    print(f"http: replica started in {seconds:.1f} s (load, warm-up)", flush=True)
    return f"http://127.0.0.1:{port}", seconds


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="tiny", help='generator spec, or "tiny" / "sd15-architecture" (exported first)')
    p.add_argument("--size", default="", help="WxH; default: the model's own resolution")
    p.add_argument("--concurrency", default="1,4,16,32", help="comma-separated client counts")
    p.add_argument("--seconds", type=float, default=10.0, help="measured time per concurrency and path")
    p.add_argument("--warmup-requests", type=int, default=3, help="unmeasured requests per client before measuring")
    p.add_argument("--max-batch-size", type=int, default=8)
    p.add_argument("--batch-wait-ms", type=float, default=5.0)
    p.add_argument("--max-batches-in-flight", default="2", help="the service's max_batches_in_flight (GPU); comma-separated: bare rows "
                   "for each, the HTTP path with the last (0: no bound)")
    p.add_argument("--max-ongoing-requests", type=int, default=0, help="per replica; default: the service's")
    p.add_argument("--dtype", default="auto")
    p.add_argument("--output-format", default="png", help="comma-separated: png, jpeg, webp (JPEG/WebP at quality 90); rows for each")
    p.add_argument("--compile", default="auto", help="the service's compile setting, used by both paths")
    p.add_argument("--decoder", default="", help="the service's decoder: a tiny decoder spec, or empty for the VAE")
    p.add_argument("--num-cpus", type=float, default=float(os.cpu_count() or 1),
                   help="the replica's CPUs, and torch threads for both paths on CPU")
    p.add_argument("--paths", default="bare,http", help="which paths to measure: bare, http or both (the HTTP/bare ratios need both)")
    p.add_argument("--serve-env", default="", help="KEY=VALUE,... set for Ray Serve's processes (controller, proxy, replica), "
                   "e.g. RAY_SERVE_THROUGHPUT_OPTIMIZED=1 (Ray's flag for direct ingress and user code on the replica's loop)")
    p.add_argument("--replica-cache-dir", default="", help="the replica's Inductor and Triton caches; default: empty ones in a temporary folder, "
                   "as on a fresh node. A folder that an earlier run filled lets a second run (say, other --serve-env flags) skip the compilation")
    p.add_argument("--inline-response-kib", type=int, help="the service's inline_response_kib (0: Ray's 100 KiB); default: the service's")
    p.add_argument("--json", help="write the results here too")
    args = p.parse_args()
    concurrencies = [int(c) for c in args.concurrency.split(",")]
    formats = args.output_format.split(",")
    if not set(formats) <= {"png", "jpeg", "webp"}:
        p.error(f"--output-format takes png, jpeg and webp, got {args.output_format}")
    try:
        in_flight_values = [int(v) for v in args.max_batches_in_flight.split(",")]
    except ValueError:
        p.error(f"--max-batches-in-flight takes comma-separated integers, got {args.max_batches_in_flight!r}")
    paths = set(args.paths.split(","))
    if not paths <= {"bare", "http"}:
        p.error(f"--paths takes bare and http, got {args.paths}")

    import ray

    from serve.config import ServiceConfig

    device = "cuda" if torch.cuda.is_available() else "cpu"
    service_args = {
        "accelerator": "gpu" if device == "cuda" else "cpu", "dtype": args.dtype, "num_cpus": args.num_cpus,
        "max_batch_size": args.max_batch_size, "batch_wait_timeout_s": args.batch_wait_ms / 1e3,
        "max_ongoing_requests": args.max_ongoing_requests or max(ServiceConfig.max_ongoing_requests, args.max_batch_size),
        "max_images": 1, "max_queued_requests": -1, "max_batches_in_flight": in_flight_values[-1],
        "autoscaling_config": {"min_replicas": 1, "max_replicas": 1}, "request_timeout_s": 120,
        "sizes": [args.size] if args.size else [], "compile": args.compile, "decoder": args.decoder,
        **({"inline_response_kib": args.inline_response_kib} if args.inline_response_kib is not None else {}),
    }
    config = ServiceConfig.from_args({**service_args, "model": "unused"})
    if device == "cpu":
        torch.set_num_threads(max(1, int(args.num_cpus)))  # the replica runs with this many threads too
    outside_serve_replica(config.max_ongoing_requests)

    with tempfile.TemporaryDirectory(prefix="bench-serve-") as tmp:
        # the replica starts as a new replica on a fresh node does (unless --replica-cache-dir): empty Inductor and Triton caches, no cache file
        # (what a cache file saves a new process: benchmarks/bench_compile_cache.py)
        caches = args.replica_cache_dir or tmp
        replica_env = {"TORCHINDUCTOR_CACHE_DIR": os.path.join(caches, "replica-inductor-cache"), "TRITON_CACHE_DIR": os.path.join(caches, "replica-triton-cache")}
        folder = args.model
        if args.model in ("tiny", "sd15-architecture"):
            started = time.perf_counter()
            folder = export_architecture(args.model, os.path.join(tmp, args.model))
            print(f"exported {args.model} in {time.perf_counter() - started:.0f} s", flush=True)
        from dmd_ray.sd.resolve import resolve_generator

        folder = resolve_generator(folder)
        device_name = torch.cuda.get_device_name() if device == "cuda" else f"{os.cpu_count()}-core CPU ({platform.processor() or platform.machine()})"
        print(f"{device_name}; torch {torch.__version__}, ray {ray.__version__}; model {args.model}; "
              f"max batch {config.max_batch_size}, wait {args.batch_wait_ms:g} ms", flush=True)

        results = {"device": device_name, "model": args.model, "args": vars(args), "bare": {}, "http": {}, "floor": []}
        bare, http, floor = results["bare"], results["http"], results["floor"]

        def save() -> None:  # after every row, so that a time-boxed run keeps the rows it finished
            if args.json:
                with open(args.json, "w") as f:
                    json.dump(results, f, indent=1)

        if "http" in paths:
            # Serve reads its flags at import in each of its processes: set here, the local cluster's processes inherit them
            os.environ.update(item.split("=", 1) for item in args.serve_env.split(",") if item)
            ray.init(address="local", include_dashboard=False, num_cpus=max(4, int(args.num_cpus) + 2), log_to_driver=False,
                     runtime_env={"env_vars": replica_env})
        try:
            # the replica's warm-up (compilation on a GPU: minutes) runs beside the bare path's; the rows of each path
            # are measured with the other idle
            replica = concurrent.futures.ThreadPoolExecutor(1).submit(start_service, folder, service_args) if "http" in paths else None
            if "bare" in paths:
                asyncio.run(run_bare(folder, device, args, config, concurrencies, formats, bare, save, in_flight_values, replica))
            if replica:
                url, results["replica_start_s"] = replica.result()
                asyncio.run(run_http(url, args, concurrencies, formats, http, floor, save))
        finally:
            if "http" in paths:
                from ray import serve

                serve.shutdown()
                ray.shutdown()

    print(f"\n{device_name}, {args.model} at {args.size or 'native size'}, compile {config.compile_mode(device) or 'off'}, "
          f"decoder {args.decoder or 'VAE'}, {datetime.date.today()}")
    if bare.get("warmup_s") and config.compile_mode(device):
        print(f"(bare warm-up {bare['warmup_s']:.1f} s with this node's compile caches as found, beside the replica's warm-up from empty caches)")
    if len(in_flight_values) > 1 or not (bare and http):  # each path's own rows
        for name, rows in (("bare", bare), ("HTTP", http)):
            if not rows:
                continue
            print(f"| format | batches in flight | clients | {name} req/s | p50 ms | p99 ms | outside the handler p50 ms | mean batch |\n"
                  "|---|---|---|---|---|---|---|---|")
            for output_format in formats:
                for row in rows[output_format]:
                    outside = f"{row['server_p50_ms']['outside the handler']:.1f}" if "server_p50_ms" in row else "-"
                    print(f"| {output_format} | {row.get('max_batches_in_flight', in_flight_values[-1]) or 'no bound'} | {row['concurrency']} | "
                          f"{row['req_per_s']:.1f} | {row['p50_ms']:.1f} | {row['p99_ms']:.1f} | {outside} | {row['mean_batch']:.1f} |")
    if bare and http:
        print("| format | clients | bare req/s | bare p50 ms | bare p99 ms | HTTP req/s | HTTP p50 ms | HTTP p99 ms | HTTP/bare req/s "
              "| added p50 ms | outside the handler p50 ms | mean batch bare / HTTP |")
        print("|---|---|---|---|---|---|---|---|---|---|---|---|")
        served = in_flight_values[-1]  # the HTTP path's bound: beside the bare rows at the same one
        for output_format, b, h in ((f, b, h) for f in formats for b, h in zip([r for r in bare[f] if r["max_batches_in_flight"] == served], http[f])):
            print(f"| {output_format} | {b['concurrency']} | {b['req_per_s']:.1f} | {b['p50_ms']:.1f} | {b['p99_ms']:.1f} | {h['req_per_s']:.1f} | "
                  f"{h['p50_ms']:.1f} | {h['p99_ms']:.1f} | {h['req_per_s'] / b['req_per_s']:.2f}x | {h['p50_ms'] - b['p50_ms']:+.1f} | "
                  f"{h['server_p50_ms']['outside the handler']:.1f} | {b['mean_batch']:.1f} / {h['mean_batch']:.1f} |")
    if floor:
        print(f"Serve's floor (GET /health, nothing computed): p50 {floor[0]['p50_ms']:.1f} ms with 1 client; "
              f"{floor[1]['req_per_s']:.0f} req/s with {floor[1]['concurrency']} clients")
    return 0


if __name__ == "__main__":
    sys.exit(main())
