"""Does a compile cache carry from one process to the next? The service's generator (OneStepImageGenerator) is
compiled and warmed up as a replica does, in three fresh processes one after another, each with empty Inductor and
Triton cache folders: "first" compiles and saves torch.compile's cache file (dmd_ray/compile_cache.py), "process"
(a plain subprocess) and "ray" (a Ray actor, as a Serve replica or a Ray Train worker runs) load that file before
compiling. Reports each one's warm-up time and how many Inductor and AOTAutograd graphs it found in the file.

    python benchmarks/bench_compile_cache.py --model tiny --max-batch-size 2                   # CPU
    python benchmarks/bench_compile_cache.py --model demo --key-details runs/keys              # GPU

With --key-details DIR each process writes the cache key of every graph it looked up, with the key's parts
(torch's own debug lines), to DIR/<role>.jsonl; the script then prints the parts that differ between the first
process and each later one for the graphs whose keys differ: the reason a cache was missed.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

ROLES = ("first", "process", "ray")


def record_cache_keys(path: str) -> None:
    """Wraps torch's two cache-key functions (Inductor's FX graph key, AOTAutograd's key) so that every key computed
    in this process is appended to `path` with its debug lines."""
    import torch._functorch._aot_autograd.autograd_cache as aot_cache
    import torch._inductor.codecache as inductor_cache

    def wrap(module, name: str, kind: str) -> None:
        original = getattr(module, name)

        def keyed(*args, **kwargs):
            key, lines = original(*args, **kwargs)
            record = {"kind": kind, "key": key, "lines": [str(line) for line in lines]}
            if kind == "inductor":  # (a real tensor, unlike a fake one, is hashed with its values)
                record["input_types"] = [type(x).__name__ for x in args[1]]
                record["input_pickles"] = input_pickles(inductor_cache, *args[:2])
            with open(path, "a") as f:
                f.write(json.dumps(record) + "\n")
            return key, lines

        setattr(module, name, keyed)

    wrap(inductor_cache, "compiled_fx_graph_hash", "inductor")
    wrap(aot_cache, "autograd_cache_key", "aot_autograd")


def input_pickles(inductor_cache, gm, example_inputs, limit: int = 4096) -> list[str]:
    """The bytes Inductor's key hashes for each graph input (its cache pickler's output), hex, the first `limit` bytes:
    when two processes' keys differ in inputs whose printed metadata is equal, the difference is in these bytes."""
    try:
        pickler = inductor_cache.FxGraphCachePickler(gm)
        return [pickler.dumps(x)[:limit].hex() for x in example_inputs]
    except Exception as e:  # torch's private pickler changes between versions: the key lines above still stand
        return [f"unavailable: {e!r}"] * len(example_inputs)


def pickle_difference(a: str, b: str) -> str:
    """pickletools' disassembly of two hex pickles, the lines that differ."""
    import difflib
    import io
    import pickletools

    def listing(hex_bytes: str) -> list[str]:
        if hex_bytes.startswith("unavailable"):
            return [hex_bytes]
        out = io.StringIO()
        try:
            pickletools.dis(bytes.fromhex(hex_bytes), out)
        except Exception as e:  # a pickle cut at the recorded length: the opcodes before the cut still show
            out.write(f"(disassembly stopped: {e})")
        return out.getvalue().splitlines()

    return "\n".join(line for line in difflib.unified_diff(listing(a), listing(b), "first", "later", lineterm="", n=1))


def warm_up(folder: str, mode: str, max_batch_size: int, cache_file: str, save: bool, work: str, role: str, key_details: str) -> dict:
    """One process's part: empty Inductor and Triton caches, the cache file loaded (unless `save`), the service's
    warm-up timed, the cache file written (if `save`). Runs in the subprocess or the Ray actor."""
    os.environ["TORCHINDUCTOR_CACHE_DIR"] = os.path.join(work, f"{role}-inductor")
    os.environ["TRITON_CACHE_DIR"] = os.path.join(work, f"{role}-triton")
    import torch

    from dmd_ray import compile_cache
    from dmd_ray.sd.one_step import OneStepImageGenerator

    if key_details:
        os.makedirs(key_details, exist_ok=True)
        record_cache_keys(os.path.join(key_details, f"{role}.jsonl"))
    device = "cuda" if torch.cuda.is_available() else "cpu"
    loaded = False if save else compile_cache.load(cache_file)
    generator = OneStepImageGenerator(folder, device=device, compile_mode=mode)
    started = time.perf_counter()
    generator.warmup(max_batch_size)
    warmup_s = time.perf_counter() - started
    saved = compile_cache.save(cache_file) if save else 0
    return {"role": role, "pid": os.getpid(), "device": device, "loaded": loaded, "saved_bytes": saved, "warmup_s": warmup_s,
            "summary": compile_cache.summary(), "compile_phases": slowest_phases(), "cuda_visible_devices": os.environ.get("CUDA_VISIBLE_DEVICES", "(unset)"),
            "omp_num_threads": os.environ.get("OMP_NUM_THREADS", "(unset)"), "torch_threads": torch.get_num_threads()}


def slowest_phases(n: int = 12) -> list[tuple[str, float]]:
    """torch.compile's own phase timers in this process (Dynamo, AOTAutograd, Inductor), the `n` largest totals."""
    import torch._dynamo.utils

    phases = []
    for line in torch._dynamo.utils.compile_times(repr="str").splitlines():
        name, *times = line.split(", ")
        if not times:
            continue
        try:
            phases.append((name, sum(float(t) for t in times)))
        except ValueError:  # the table's heading
            continue
    return sorted(phases, key=lambda phase: -phase[1])[:n]


def differing_parts(first: list[dict], other: list[dict]) -> list[str]:
    """For the n-th key of each kind in both processes (graphs are compiled in the same order), the debug lines of
    one side that the other lacks, when the keys differ."""
    report = []
    for kind in ("aot_autograd", "inductor"):
        a = [r for r in first if r["kind"] == kind]
        b = [r for r in other if r["kind"] == kind]
        for i, (x, y) in enumerate(zip(a, b)):
            if x["key"] == y["key"]:
                continue
            lines_x, lines_y = set(x["lines"]), set(y["lines"])
            only_x = [line for line in x["lines"] if line not in lines_y]
            only_y = [line for line in y["lines"] if line not in lines_x]
            report.append(f"{kind} graph {i}: keys differ\n  first only:  " + "\n  first only:  ".join(line[:400] for line in only_x[:4])
                          + "\n  later only:  " + "\n  later only:  ".join(line[:400] for line in only_y[:4]))
            differing = [j for j, (p, q) in enumerate(zip(x.get("input_pickles", []), y.get("input_pickles", []))) if p != q]
            if differing:  # the first input whose bytes differ, disassembled
                j = differing[0]
                report.append(f"{kind} graph {i}: {len(differing)} inputs' pickled bytes differ, the first is input {j} "
                              f"({x['input_types'][j]} / {y['input_types'][j]}):\n{pickle_difference(x['input_pickles'][j], y['input_pickles'][j])}")
        if a and b and len(a) != len(b):  # (a process that found AOTAutograd's graphs looks up no Inductor keys)
            report.append(f"{kind}: {len(a)} keys in the first process, {len(b)} in the later one")
    return report


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="tiny", help='generator spec, or "tiny" / "sd15-architecture" (exported first)')
    p.add_argument("--mode", default="", help="torch.compile mode; default: reduce-overhead on a GPU (the service's), default on a CPU (where the service runs eager)")
    p.add_argument("--max-batch-size", type=int, default=2)
    p.add_argument("--roles", default=",".join(ROLES), help="which of first, process, ray to run (first always runs)")
    p.add_argument("--key-details", default="", help="a folder for each process's cache keys and their parts")
    p.add_argument("--json", help="write the results here too")
    p.add_argument("--child", help=argparse.SUPPRESS)  # JSON arguments of warm_up: this process is a subprocess
    args = p.parse_args()
    if not set(args.roles.split(",")) <= set(ROLES):
        p.error(f"--roles takes {', '.join(ROLES)}, got {args.roles}")
    if args.child:
        print("RESULT " + json.dumps(warm_up(**json.loads(args.child))), flush=True)
        return 0

    import torch

    from benchmarks.bench_serve import export_architecture
    from benchmarks.common import device_name
    from dmd_ray.sd.resolve import resolve_generator

    device = "cuda" if torch.cuda.is_available() else "cpu"
    mode = args.mode or ("reduce-overhead" if device == "cuda" else "default")
    roles = ["first", *[r for r in args.roles.split(",") if r in ROLES[1:]]]
    results = []
    with tempfile.TemporaryDirectory(prefix="bench-compile-cache-") as work:
        folder = args.model
        if args.model in ("tiny", "sd15-architecture"):
            folder = export_architecture(args.model, os.path.join(work, args.model))
        folder = resolve_generator(folder)
        common = {"folder": folder, "mode": mode, "max_batch_size": args.max_batch_size, "cache_file": os.path.join(work, "compile_cache.bin"),
                  "work": work, "key_details": os.path.abspath(args.key_details) if args.key_details else ""}
        for role in roles:
            started = time.perf_counter()
            if role == "ray":
                import ray

                ray.init(address="local", include_dashboard=False, log_to_driver=False, num_cpus=os.cpu_count())
                try:
                    task = ray.remote(num_gpus=1 if device == "cuda" else 0, num_cpus=os.cpu_count())(warm_up)
                    result = ray.get(task.remote(**common, save=False, role=role))
                finally:
                    ray.shutdown()
            else:
                kwargs = {**common, "save": role == "first", "role": role}
                out = subprocess.run([sys.executable, os.path.abspath(__file__), "--child", json.dumps(kwargs)],
                                     capture_output=True, text=True, cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
                lines = [line for line in out.stdout.splitlines() if line.startswith("RESULT ")]
                if out.returncode or not lines:
                    sys.exit(f"{role} failed ({out.returncode}):\n{out.stderr[-3000:]}")
                result = json.loads(lines[-1].removeprefix("RESULT "))
            result["process_s"] = time.perf_counter() - started
            results.append(result)
            print(f"{role:8s} warm-up {result['warmup_s']:7.1f} s (process {result['process_s']:6.1f} s)  {result['summary']}  "
                  f"loaded {result['loaded']}, saved {result['saved_bytes'] / 2**20:.1f} MiB; CUDA_VISIBLE_DEVICES "
                  f"{result['cuda_visible_devices']}, OMP_NUM_THREADS {result['omp_num_threads']}, torch threads {result['torch_threads']}", flush=True)
            if args.json:
                with open(args.json, "w") as f:
                    json.dump({"model": args.model, "mode": mode, "device": device_name(device),
                               "torch": torch.__version__, "results": results}, f, indent=1)
    for result in results:  # where each warm-up's compile time went, by torch's own phase timers
        print(f"\n{result['role']}: torch.compile's slowest phases (s): " + "; ".join(f"{name} {t:.1f}" for name, t in result["compile_phases"]))
    if args.key_details:
        keys = {role: [json.loads(line) for line in open(os.path.join(args.key_details, f"{role}.jsonl"))]
                for role in roles if os.path.exists(os.path.join(args.key_details, f"{role}.jsonl"))}
        for role in roles[1:]:
            parts = differing_parts(keys.get("first", []), keys.get(role, []))
            print(f"\n{role} against first: " + ("every key the same" if not parts else f"{len(parts)} differences"))
            print("\n".join(parts[:12]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
