"""Recipes side by side on one machine: pairs made once, one `jobs/distill.py` run per recipe at the same time (the
GPU shared through fractional GPUs), each stopped by the same wall-time limit, then `jobs/evaluate.py` on every
export beside the teacher, with bootstrap intervals: DMD's Tab. 2 and the DMD2 rows at equal budget.

    python benchmarks/quality_table.py --minutes 6 --out runs/quality                  # one GPU, the default recipes
    python benchmarks/quality_table.py --minutes 0.5 --num-pairs 64 --pair-steps 4 --num-samples 180 \\
        --more "--dm-batch-size 8 --reg-batch-size 4 --eval-every 0" --out runs/quality-cpu   # a CPU check of the plumbing

Recipes are `name=flags` separated by ";" (`--recipes`), on top of `--common` and `--more` (later flags win).
The script starts its own Ray head (`ray start --head`, stopped at the end) so that the runs share one cluster.
Each run stops training `--minutes` after it started (its --time-limit-minutes: Ray Train's start and compilation
count) and is killed if it has not exited `--grace-minutes` later (export, shutdown), so the evaluation always
runs. With `--stagger` the first recipe starts alone and the others when it has compiled: runs of the same shapes
then find torch.compile's kernels in the machine's caches instead of compiling them all at once on the same cores,
and they stop at the first one's wall time (a shorter --time-limit-minutes). `--num-samples 0` skips the evaluation
(run jobs/evaluate.py on the exports elsewhere: it needs no GPU). Writes <out>/table.md (the
evaluation, then each run's in-training probe) and <out>/eval/metrics.json + grid.png; each run logs to
<out>/<recipe>.log and writes under <out>/<recipe>/.
"""
from __future__ import annotations

import argparse
import json
import os
import shlex
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RECIPES = ("dmd=;"
           "no-regression=--lambda-reg 0;"
           "no-dm=--dm-weight 0;"
           "dmd2=--lambda-reg 0 --gan-weight 3e-3 --fake-updates 5 --gan-real renders")
COMMON = ("--teacher demo --dm-batch-size 64 --reg-batch-size 16 --zero-stage 0 --lr 1e-4 --warmup-steps 20 "
          "--guidance-scale 3 --regression-space pixel --lpips-backbone alex --lpips-pretrained-backbone false "
          "--lpips-min-size 64 --export-dtype float16 --num-workers 1 --max-steps 1000000 --checkpoint-every 0 "
          "--log-every 100 --sample-every 0 --eval-every 500 --eval-samples 360")


def log(msg: str) -> None:
    print(f"[quality {time.strftime('%H:%M:%S')}] {msg}", flush=True)


def run(cmd: list[str], env: dict, timeout: float, log_file: str) -> int:
    """`cmd` from the repository root, its output into `log_file`; 124 when it outlasts `timeout`."""
    with open(log_file, "w") as out:
        try:
            return subprocess.run(cmd, env=env, cwd=ROOT, timeout=timeout, stdout=out, stderr=subprocess.STDOUT).returncode
        except subprocess.TimeoutExpired:
            return 124


def wait_for_line(path: str, texts: tuple[str, ...], proc: subprocess.Popen, timeout: float) -> bool:
    """Whether one of `texts` appeared in the log at `path` before `proc` exited or `timeout` seconds passed."""
    end = time.monotonic() + timeout
    while time.monotonic() < end and proc.poll() is None:
        if os.path.exists(path) and any(text in open(path, errors="replace").read() for text in texts):
            return True
        time.sleep(2)
    return False


def read_history(path: str) -> list[dict]:
    return [json.loads(line) for line in open(path)] if os.path.exists(path) else []


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--recipes", default=RECIPES)
    p.add_argument("--common", default=COMMON, help="flags every run gets (the recipes' flags come after)")
    p.add_argument("--more", default="", help="flags added to --common")
    p.add_argument("--minutes", type=float, default=6.0, help="each run's training time limit (--time-limit-minutes)")
    p.add_argument("--grace-minutes", type=float, default=1.5, help="per run, after its time limit: export and shutdown")
    p.add_argument("--num-pairs", type=int, default=8192)
    p.add_argument("--pair-steps", type=int, default=50)
    p.add_argument("--pair-batch-size", type=int, default=1024)
    p.add_argument("--num-samples", type=int, default=1440, help="per model in the evaluation; 0: no evaluation (the probe only)")
    p.add_argument("--out", default="runs/quality")
    p.add_argument("--port", type=int, default=6390)
    p.add_argument("--stagger", action="store_true", help="start the other recipes once the first has compiled")
    p.add_argument("--eval-timeout", type=float, default=900.0, help="seconds")
    args = p.parse_args()

    recipes = dict(item.split("=", 1) for item in args.recipes.split(";") if item.strip())
    out = os.path.abspath(args.out)
    os.makedirs(out, exist_ok=True)
    env = {**os.environ, "RAY_AUTH_MODE": "disabled", "RAY_ADDRESS": f"127.0.0.1:{args.port}"}
    python = sys.executable
    # logical CPUs beyond the cores, as the embedded cluster has (cluster.init_ray): Ray Data's read tasks need a
    # slot beside the train workers
    cpus = str((os.cpu_count() or 1) + 4)
    head = subprocess.run([python, "-m", "ray.scripts.scripts", "start", "--head", "--port", str(args.port), "--num-cpus", cpus, "--disable-usage-stats"],
                          env=env, capture_output=True, text=True)
    if head.returncode:
        sys.exit(f"ray start failed:\n{head.stderr[-2000:]}")
    try:
        started = time.perf_counter()
        pairs = os.path.join(out, "pairs")
        prompts = os.path.join(ROOT, "dmd_ray", "assets", "shapes_prompts.txt")
        pair_flags = ["--teacher", "demo", "--prompts", prompts, "--sampler", "pndm", "--steps", str(args.pair_steps), "--guidance-scale", "3"]
        code = run([python, "jobs/generate_pairs.py", *pair_flags, "--num-pairs", str(args.num_pairs), "--shard-size", str(args.pair_batch_size),
                    "--batch-size", str(args.pair_batch_size), "--out", pairs], env, 600, os.path.join(out, "pairs.log"))
        if code:
            sys.exit(f"pair generation failed ({code}): see {out}/pairs.log")
        log(f"{args.num_pairs} pairs in {time.perf_counter() - started:.0f} s")

        share = f"{1 / len(recipes):.3f}"
        runs: dict[str, subprocess.Popen] = {}
        first_started = time.monotonic()

        def start(name: str, minutes: float) -> None:
            cmd = [python, "jobs/distill.py", *shlex.split(args.common), *shlex.split(args.more), "--prompts", prompts, "--pairs", pairs, "--pair-sampler", "pndm",
                   "--pair-steps", str(args.pair_steps), "--gpus-per-worker", share, "--time-limit-minutes", f"{minutes:.2f}",
                   "--output", os.path.join(out, name), *shlex.split(recipes[name])]
            runs[name] = subprocess.Popen(cmd, env=env, cwd=ROOT, stdout=open(os.path.join(out, f"{name}.log"), "w"), stderr=subprocess.STDOUT)
            log(f"{name}: started, {minutes:.2f} min")

        names = list(recipes)
        for name in names[:1] if args.stagger else names:
            start(name, args.minutes)
        if args.stagger and len(names) > 1:
            # compiled (the worker's line), or training uncompiled (its first logged step)
            ready = wait_for_line(os.path.join(out, f"{names[0]}.log"), ("[distill] compilation:", "[distill] step "), runs[names[0]],
                                  60 * (args.minutes + args.grace_minutes))
            log(f"{names[0]}: {'training' if ready else 'no training line'} after {time.monotonic() - first_started:.0f} s")
            remaining = args.minutes - (time.monotonic() - first_started) / 60  # so that all runs stop at about the same time
            for name in names[1:]:
                start(name, max(0.5, remaining))
        deadline = first_started + 60 * (args.minutes + args.grace_minutes)
        for name, proc in runs.items():
            try:
                proc.wait(timeout=max(1.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                proc.kill()
            log(f"{name}: exit {proc.wait()}")
        exports = {name: os.path.join(out, name, "export") for name in recipes if os.path.isdir(os.path.join(out, name, "export"))}
        if not exports:
            sys.exit("no run exported a generator: see the runs' logs")
        models = ["teacher:demo", "demo", *exports.values()]
        code = 0 if args.num_samples == 0 else run(
            [python, "jobs/evaluate.py", "--model", ",".join(models), "--num-samples", str(args.num_samples), "--batch-size", "720",
             "--output", os.path.join(out, "eval")], env, args.eval_timeout, os.path.join(out, "eval.log"))
        if code:
            sys.exit(f"evaluation failed ({code}): see {out}/eval.log")
    finally:
        subprocess.run([python, "-m", "ray.scripts.scripts", "stop"], env=env, capture_output=True)

    results = json.load(open(os.path.join(out, "eval", "metrics.json")))["models"] if args.num_samples else {}
    names = {"teacher:demo": "teacher (PNDM 50, guidance 3)", "demo": "shipped `demo`", **{v: k for k, v in exports.items()}}
    histories = {name: read_history(os.path.join(out, name, "metrics.jsonl")) for name in recipes}
    evaluation = ["| model | iterations | FID [95%] | prompt accuracy [95%] | LPIPS diversity |", "|---|---|---|---|---|"]
    for spec, row in results.items():  # keyed by the specs passed (exports are absolute paths already)
        name = names.get(spec, spec)
        steps = str(histories[name][-1]["step"]) if histories.get(name) else "-"
        evaluation.append(f"| {name} | {steps} | {row['fid']:.3f} [{row['fid_ci95'][0]:.3f}, {row['fid_ci95'][1]:.3f}] | "
                          f"{row['prompt_accuracy']:.3f} [{row['prompt_accuracy_ci95'][0]:.3f}, {row['prompt_accuracy_ci95'][1]:.3f}] | "
                          f"{row.get('lpips_diversity', float('nan')):.3f} |")
    probe = ["In-training probe (FID / prompt accuracy on the probe's samples; ms per iteration over the log window):", "",
             "| recipe | flags | step: FID / accuracy / ms |", "|---|---|---|"]
    for name, history in histories.items():
        points = [f"{r['step']}: {r['eval_fid']:.2f} / {r['eval_prompt_accuracy']:.3f} / {1000 * r['step_time_s']:.0f}" for r in history if "eval_fid" in r]
        probe.append(f"| {name} | `{recipes[name].strip() or '(common)'}` | {'; '.join(points) or '-'} |")
    table = "\n\n".join("\n".join(part) for part in ([evaluation] if results else []) + [probe])
    with open(os.path.join(out, "table.md"), "w") as f:
        f.write(table + "\n")
    print(table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
