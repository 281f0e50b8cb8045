"""The service's one typed configuration, read from the `args` dict of Ray Serve's application builder.

The same keys come from `args:` in serve/config.yaml (typed YAML values) or from `serve run serve.app:build_app
key=value ...` (strings); both go through the jobs' coercion (dmd_ray.typed_config), so a value is spelt the same
everywhere. Unknown keys are rejected: a typo must not silently fall back to a default.
"""
from __future__ import annotations

from dataclasses import dataclass, field

from dmd_ray.sd.one_step import ImageSize
from dmd_ray.sd.teacher import DTYPES
from dmd_ray.typed_config import from_dict, raise_problems

ACCELERATORS = ("auto", "gpu", "cpu")
MAX_INLINE_RESPONSE_KIB = 8192  # below Ray's cap on the bytes one RPC inlines (task_rpc_inlined_bytes_limit, 10 MiB)


def default_autoscaling() -> dict:
    return {
        "min_replicas": 1,
        "max_replicas": 2,
        # requests in flight per replica that Serve steers towards: a full batch being generated while the next
        # one gathers
        "target_ongoing_requests": 8,
        "upscale_delay_s": 10.0,
        "downscale_delay_s": 60.0,
    }


@dataclass(frozen=True)
class ServiceConfig:
    # what to serve
    model: str = "demo"  # built-in generator name, local folder or s3:// prefix of an exported generator
    model_name: str = ""  # the id in /v1/models; "" means the built-in name or the folder's name
    cache_dir: str = ""  # where s3:// generators are downloaded; "" means ~/.cache/dmd_ray/generators
    accelerator: str = "auto"  # auto: a GPU per replica when the cluster has GPUs, else CPU
    dtype: str = "auto"  # auto: float16 on GPU, float32 on CPU
    # torch.compile of the text encoder, the UNet and the decoder: auto (GPU: reduce-overhead, i.e. CUDA graphs per
    # power-of-two batch and image size, recorded at warm-up; CPU: eager), false, or a torch.compile mode
    compile: str = "auto"
    # torch.compile's artifacts (dmd_ray/compile_cache.py) in one file, local or s3://: loaded at replica start when it
    # exists, written after the first replica's warm-up otherwise, so that new replicas of the same model, sizes and
    # GPU type skip most of the compilation. "" keeps only Inductor's own cache on each node.
    compile_cache: str = ""
    decoder: str = ""  # "": the generator's VAE; a tiny decoder (TAESD architecture): demo-tiny, a folder, s3:// or a hub id (madebyollin/taesd)
    num_cpus: float = 1.0  # per replica; on CPU also the number of torch threads
    encode_threads: int = 0  # threads encoding PNG/JPEG/WebP beside generation; 0: max(2, num_cpus)
    num_gpus: float = 1.0  # per replica when on GPU (fractions pack replicas onto one GPU)
    warmup: bool = True  # run full batches at start-up, before the replica takes traffic
    # dynamic batching (@serve.batch): a batch holds at most max_batch_size images
    max_batch_size: int = 8
    batch_wait_timeout_s: float = 0.005
    # batches queued on the GPU at once (GPU replicas): the generator thread queues a batch, then waits until the GPU
    # has drawn the one before it, so that under load the requests arriving meanwhile fill the next batch instead of
    # trickling after the last one in batches of one or two. 0: no bound.
    max_batches_in_flight: int = 2
    # backpressure: requests a replica holds (generating or waiting for the generator), and requests queued at each
    # proxy beyond that before overload answers. A replica turns its backlog into full batches, while Serve re-offers
    # a request queued at the proxy with backoff (25 ms doubling to 0.5 s) and leaves the replica idle meanwhile
    # (measured: 5x less throughput once clients outnumber max_ongoing_requests): keep the proxy queue for bursts.
    max_ongoing_requests: int = 32
    max_queued_requests: int = 64
    overload_status_code: int = 503  # or 429
    retry_after_s: float = 1.0
    autoscaling_config: dict = field(default_factory=default_autoscaling)  # keys of ray.serve.config.AutoscalingConfig
    health_check_period_s: float = 10.0
    health_check_timeout_s: float = 30.0
    # requests
    request_timeout_s: float = 30.0  # from a request's arrival at a replica to its answer; then 504
    max_prompt_chars: int = 1000
    max_images: int = 4  # the most images one request may ask for (`n`)
    sizes: tuple[str, ...] = ()  # "WxH" sizes served, the first one the default; () means the model's own size
    api_key_env: str = "DMD_SERVE_API_KEY"  # the environment variable holding the API key; unset or empty: no auth
    # responses up to this size go from the replica to the HTTP proxy inside Ray's RPC message instead of through the
    # object store (Ray's own limit, 100 KiB, sends every 512x512 image the slow way: measured, docs/serving.md); 0
    # keeps Ray's limit. The replica's RAY_max_direct_call_object_size.
    inline_response_kib: int = 4096

    @classmethod
    def from_args(cls, args: dict | None) -> "ServiceConfig":
        values = dict(args or {})
        if "autoscaling_config" in values:  # partial overrides keep the other defaults
            autoscaling = from_dict(cls, {"autoscaling_config": values["autoscaling_config"]}).autoscaling_config
            values["autoscaling_config"] = {**default_autoscaling(), **autoscaling}
        config = from_dict(cls, values)
        config.check()
        return config

    def compile_mode(self, device: str) -> str:
        """The torch.compile mode for a replica on `device` ("" for eager)."""
        if self.compile == "auto":
            return "reduce-overhead" if device == "cuda" else ""
        return "" if self.compile == "false" else ("default" if self.compile == "true" else self.compile)

    def check(self) -> None:
        problems = []
        if self.accelerator not in ACCELERATORS:
            problems.append(f"accelerator must be one of {ACCELERATORS}, not {self.accelerator!r}")
        if self.dtype not in ("auto", *DTYPES):
            problems.append(f"dtype must be auto or one of {tuple(DTYPES)}, not {self.dtype!r}")
        for name in ("max_batch_size", "max_ongoing_requests", "max_prompt_chars", "max_images"):
            if getattr(self, name) < 1:
                problems.append(f"{name} must be at least 1")
        if not 0 <= self.inline_response_kib <= MAX_INLINE_RESPONSE_KIB:
            problems.append(f"inline_response_kib must be in [0, {MAX_INLINE_RESPONSE_KIB}] (0: Ray's own limit), not {self.inline_response_kib}")
        for name in ("num_cpus", "batch_wait_timeout_s", "retry_after_s", "encode_threads", "max_batches_in_flight"):
            if getattr(self, name) < 0:
                problems.append(f"{name} must not be negative")
        for name in ("health_check_period_s", "health_check_timeout_s", "request_timeout_s"):
            if getattr(self, name) <= 0:
                problems.append(f"{name} must be positive")
        if self.num_gpus <= 0:
            problems.append("num_gpus must be positive (use accelerator: cpu for CPU replicas)")
        # A replica must be able to hold a full batch, or batches never fill and the batching wait is pure latency.
        if self.max_ongoing_requests < self.max_batch_size:
            problems.append(f"max_ongoing_requests ({self.max_ongoing_requests}) must be >= max_batch_size ({self.max_batch_size})")
        # A batch counts images; a request for more images than a batch holds could never be scheduled.
        if self.max_images > self.max_batch_size:
            problems.append(f"max_images ({self.max_images}) must be <= max_batch_size ({self.max_batch_size})")
        if self.max_queued_requests < 1 and self.max_queued_requests != -1:
            problems.append("max_queued_requests must be at least 1, or -1 for an unbounded queue")
        if self.overload_status_code not in (429, 503):
            problems.append(f"overload_status_code must be 429 or 503, not {self.overload_status_code}")
        for size in self.sizes:
            try:
                ImageSize.parse(size)
            except ValueError as e:
                problems.append(str(e))
        if len(set(self.sizes)) != len(self.sizes):
            problems.append(f"sizes lists a size twice: {list(self.sizes)}")
        if not self.api_key_env or not self.api_key_env.replace("_", "").isalnum():
            problems.append(f"api_key_env must name an environment variable, not {self.api_key_env!r}")
        problems += _autoscaling_problems(self.autoscaling_config)
        raise_problems("ServiceConfig", problems)


def _autoscaling_problems(autoscaling: dict) -> list[str]:
    from ray.serve.config import AutoscalingConfig

    unknown = sorted(set(autoscaling) - set(AutoscalingConfig.model_fields))
    if unknown:
        return [f"unknown autoscaling_config key(s) {', '.join(map(repr, unknown))}; known: {', '.join(AutoscalingConfig.model_fields)}"]
    try:
        AutoscalingConfig(**autoscaling)
    except Exception as e:  # pydantic's ValidationError: keep only the first line of each error
        return [f"autoscaling_config: {' '.join(str(e).split())}"]
    return []
