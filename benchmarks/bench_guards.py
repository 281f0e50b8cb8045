"""torch.compile's guard checks per call of a compiled UNet: all guards (before) against only the guards that tell
the cached graphs apart (`distill_worker.step_guards`, what a compiled run's steps use after warm-up).

    python benchmarks/bench_guards.py                      # the demo UNet, CPU
    python benchmarks/bench_guards.py --teacher tiny --calls 100

The UNet is compiled with Dynamo's "eager" backend (no Inductor: seconds to compile, and the guards are the same
whatever the backend), called in training mode at a fixed shape; "guard lookup" is torch.profiler's "TorchDynamo
Cache Lookup" per call, the host time a compiled network's call pays before its graph runs.
"""
from __future__ import annotations

import argparse
import copy
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402

from benchmarks.common import default_device, device_name, print_table, synchronize  # noqa: E402


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--teacher", default="demo")
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--calls", type=int, default=50)
    p.add_argument("--rounds", type=int, default=3, help="alternating rounds of each setting (medians reported)")
    args = p.parse_args()
    from torch.profiler import profile

    from dmd_ray.config import DistillConfig
    from dmd_ray.distributed.distill_worker import step_guards
    from dmd_ray.sd.resolve import load_teacher

    device = default_device()
    cfg = DistillConfig(zero_stage=0, skip_guards=True)
    teacher = load_teacher(args.teacher)
    unet = copy.deepcopy(teacher.unet).train().to(device)
    unet.compile(backend="eager", dynamic=False)
    shape = teacher.latent_shape(teacher.default_resolution)
    x, t = torch.randn(args.batch, *shape, device=device), torch.full((args.batch,), 500, device=device)
    with torch.no_grad():
        cond = teacher.encode_prompts(["a red circle"] * args.batch).to(device)

    def call():
        return unet(x, t, encoder_hidden_states=cond, return_dict=False)[0]

    for _ in range(3):  # compiles
        call()
    results: dict[str, dict[str, list]] = {"all guards (before)": {"ms": [], "lookup": []}, "differentiating guards (step_guards)": {"ms": [], "lookup": []}}
    for _ in range(args.rounds):
        for (name, r), skip in zip(results.items(), (False, True)):
            with step_guards(cfg, skip):
                synchronize(device)
                started = time.perf_counter()
                for _ in range(args.calls):
                    call()
                synchronize(device)
                r["ms"].append(1e3 * (time.perf_counter() - started) / args.calls)
                with profile() as prof:
                    for _ in range(10):
                        call()
            lookup = [e for e in prof.key_averages() if "Cache Lookup" in e.key]
            r["lookup"].append(lookup[0].cpu_time_total / 10 / 1e3 if lookup else 0.0)
        with step_guards(cfg, True):
            fast = call()
        assert torch.equal(fast, call()), "the differentiating guards picked another graph"
    print(f"teacher {args.teacher}, UNet forward at batch {args.batch}, training mode, {device_name(device)}, {time.strftime('%Y-%m-%d')}; "
          f"median of {args.rounds} alternating rounds of {args.calls} calls")
    print_table(["guards", "ms per call", "guard lookup ms per call"],
                [[name, f"{statistics.median(r['ms']):.2f}", f"{statistics.median(r['lookup']):.3f}"] for name, r in results.items()])
    return 0


if __name__ == "__main__":
    sys.exit(main())
