#!/usr/bin/env bash
# The GPU figures of BENCHMARKS.md, each benchmark time-boxed, logs and JSON results in one folder:
#
#     bash benchmarks/gpu_suite.sh OUT                 # every stage (time boxes add up to 82 minutes on one H200)
#     bash benchmarks/gpu_suite.sh OUT demo,serve      # some stages
#
# Each stage's time box in seconds: DEMO_S, SD15_S, SD15_COMPILED_S, SD15_SWEEP_S, SERVE_S, SERVE_HTTP_S, SERVE_HTTP_OPTIMIZED_S, ONESTEP_S, PAIRS_S, COMPILE_CACHE_S.
# demo:    a DMD iteration on the demo teacher (issue 14's first size): the plain loop and Ray Train + DeepSpeed
#          ZeRO-0 with the fast settings, then the eager path before issue 14
# sd15:    the same at the SD 1.5 architecture, 512x512, ZeRO-2, gradient checkpointing, both rows eager: MFU
#          against the matmul peak, Ray against plain (the SD 1.5 step's cold compilation takes minutes, hence:)
# sd15-compiled: the plain loop alone, compiled in ZeRO-2's numerics and mode: compile time, compiled MFU
# sd15-sweep: the plain loop eager in ZeRO-2's numerics at growing per-GPU batches until one runs out of memory:
#          the batch with the most samples/s, its memory
# serve:   the one-step service at the SD 1.5 architecture: bare generator and HTTP, 1/8/32 clients, three formats
# serve-http, serve-http-optimized: the HTTP path alone (JPEG and WebP, then JPEG), with Ray Serve's default flags, then with
#          RAY_SERVE_THROUGHPUT_OPTIMIZED=1; the second replica finds the first one's kernels (a shared cache folder)
# onestep: the service's generator without HTTP, SD 1.5 architecture: eager against CUDA graphs, the VAE against a
#          tiny decoder, fp16 against bf16
# pairs:   teacher pairs at the SD 1.5 architecture, 50 PNDM steps, guidance 3: eager diffusers, then the job's sampler
#          with CUDA graphs in a plain loop and through Ray Data (issue 16's pairs/s)
# compile-cache: the service's generator (demo) compiled in one process, then in a Ray actor that loads the first
#          one's cache file: hits, warm-up times, and which parts of the cache keys differ (issues 14 and 16)
# A stage cut by its time box keeps the rows it finished (each benchmark writes its JSON after every row).
# The Ray rows profile their own steps after the compiled warm-up (profile_steps); the timing leaves out the log
# windows that hold them.
set -uo pipefail
OUT=${1:?usage: bash benchmarks/gpu_suite.sh OUT [demo,sd15,sd15-compiled,sd15-sweep,serve,serve-http,serve-http-optimized,onestep,pairs,compile-cache]}
STAGES=${2:-demo,sd15,sd15-compiled,sd15-sweep,serve,serve-http,serve-http-optimized,onestep,pairs,compile-cache}
cd "$(dirname "$0")/.."
mkdir -p "$OUT"

stage() {
    local name=$1 limit=$2
    shift 2
    case ",$STAGES," in *",$name,"*) ;; *) return 0 ;; esac
    echo "== $name, time box ${limit} s: $*"
    local start=$(date +%s)
    timeout --signal=INT --kill-after=30 "$limit" "$@" > "$OUT/$name.log" 2>&1
    echo "== $name: exit $? after $(( $(date +%s) - start )) s (log: $OUT/$name.log)"
    grep -v "Warning\|warn(" "$OUT/$name.log" | tail -n 30
}

stage demo "${DEMO_S:-540}" python benchmarks/bench_distill.py --teacher demo --dm-batch 64 --reg-batch 16 \
    --lpips-backbone alex --lpips-min-size 64 --zero-stages 0 --steps 100 --log-every 25 --baselines --baseline-steps 10 \
    --profile-steps 5 --json "$OUT/demo.json"
stage sd15 "${SD15_S:-540}" python benchmarks/bench_distill.py --teacher sd15-architecture --dm-batch 16 --reg-batch 4 \
    --zero-stages 2 --gradient-checkpointing --steps 12 --log-every 6 --profile-steps 2 --compile false --json "$OUT/sd15.json"
stage sd15-compiled "${SD15_COMPILED_S:-540}" python benchmarks/bench_distill.py --teacher sd15-architecture --dm-batch 16 \
    --reg-batch 4 --zero-stages 2 --skip-ray --gradient-checkpointing --steps 12 --log-every 6 --profile-steps 2 \
    --json "$OUT/sd15-compiled.json"
stage sd15-sweep "${SD15_SWEEP_S:-540}" python benchmarks/batch_sweep.py --teacher sd15-architecture --zero-stage 2 \
    --gradient-checkpointing --batches 16x4,32x8,48x12,64x16 --steps 6 --log-every 3 --json "$OUT/sd15-sweep.json"
stage serve "${SERVE_S:-540}" python benchmarks/bench_serve.py --model sd15-architecture --concurrency 1,8,32 \
    --output-format jpeg,png,webp --max-batch-size 8 --seconds 4 --json "$OUT/serve.json"
stage serve-http "${SERVE_HTTP_S:-330}" python benchmarks/bench_serve.py --model sd15-architecture --paths http --concurrency 1,8,32 \
    --output-format jpeg,webp --max-batch-size 8 --seconds 4 --replica-cache-dir /tmp/dmd-serve-http-caches --json "$OUT/serve-http.json"
stage serve-http-optimized "${SERVE_HTTP_OPTIMIZED_S:-240}" python benchmarks/bench_serve.py --model sd15-architecture --paths http \
    --concurrency 1,8,32 --output-format jpeg --max-batch-size 8 --seconds 4 --replica-cache-dir /tmp/dmd-serve-http-caches \
    --serve-env RAY_SERVE_THROUGHPUT_OPTIMIZED=1 --json "$OUT/serve-http-optimized.json"
stage onestep "${ONESTEP_S:-540}" python benchmarks/bench_onestep.py --model sd15-architecture --batch 16 --iters 20 \
    --dtype float16,bfloat16 --json "$OUT/onestep.json"
stage pairs "${PAIRS_S:-540}" python benchmarks/bench_pairs.py --teacher sd15-architecture --resolution 512 --steps 50 --guidance 3 \
    --batch-size 16 --num-pairs 128 --shard-size 32 --compile auto --diffusers-baseline --json "$OUT/pairs.json"
stage compile-cache "${COMPILE_CACHE_S:-300}" python benchmarks/bench_compile_cache.py --model demo --max-batch-size 2 --roles first,ray \
    --key-details "$OUT/keys" --json "$OUT/compile-cache.json"
