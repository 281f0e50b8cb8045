"""Ray Serve application: an exported one-step generator behind HTTP, with dynamic batching and autoscaling.

    serve run serve/config.yaml                      # or: serve run serve.app:build_app model=/path/to/export

One deployment does everything (HTTP parsing and generation), so a request crosses one hop from the proxy to a
replica. Concurrent requests on a replica are gathered by `@serve.batch` and generated in batches of at most
`max_batch_size` images (see BatchedGenerator); Serve's proxy caps each replica at `max_ongoing_requests` and
queues at most `max_queued_requests` more before answering 503 (or 429), and the autoscaler keeps
`target_ongoing_requests` per replica. docs/serving.md has the API, the configuration and the measurements.

Routes: POST /v1/images/generations (OpenAI's images API), GET /v1/models, POST /generate (one image: PNG, JPEG or
WebP), GET /health,
GET / (a page that regenerates as you type), /openapi.json and /docs. Errors use OpenAI's error JSON.
"""
# No `from __future__ import annotations`: FastAPI must see real types on the methods of a class that Serve
# pickles by value, where string annotations cannot be resolved.
import asyncio
import base64
import collections
import hmac
import logging
import os
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Literal, NamedTuple

import numpy as np
from fastapi import Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse, Response
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from pydantic import BaseModel, ConfigDict, Field
from ray import serve
from starlette.exceptions import HTTPException as StarletteHTTPException

from dmd_ray import compile_cache
from dmd_ray.images import MEDIA_TYPES, encode_image
from dmd_ray.sd import resolve
from dmd_ray.sd.one_step import SEED_MODULUS, GenerationJob, ImageSize, OneStepImageGenerator, refuse_multi_step
from serve.config import ServiceConfig
from serve.requests import RequestError, RequestLimits, openai_error, validate_generation

logger = logging.getLogger("ray.serve")

PAGE_PATH = Path(__file__).with_name("static") / "index.html"
UNHEALTHY_AFTER_FAILED_BATCHES = 3  # consecutive failed batches (e.g. a broken GPU) before Serve replaces the replica

# --------------------------------------------------------------------------------------------- HTTP schema
api = FastAPI(
    title="dmd-ray one-step generator",
    version="1",
    description="A text-to-image generator distilled with DMD into one step, served by Ray Serve. "
    "POST /v1/images/generations follows OpenAI's images API (with `seed` as an extension).",
)
bearer_scheme = HTTPBearer(auto_error=False, description="The API key, when the server sets one")


class ErrorDetail(BaseModel):
    message: str
    type: str
    param: str | None = None
    code: str | None = None


class ErrorResponse(BaseModel):
    error: ErrorDetail


class ImageGenerationRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    prompt: str = Field(description="What the image shows; at most `max_prompt_chars` characters (1000 by default).")
    model: str | None = Field(None, description="The served model's id (GET /v1/models); optional.")
    n: int = Field(1, ge=1, description="How many images; at most `max_images` (4 by default).")
    size: str | None = Field(None, description='"WIDTHxHEIGHT", one of the served sizes, or "auto" (the default size).')
    response_format: Literal["b64_json", "url"] | None = Field(None, description="Only b64_json is served.")
    output_format: Literal["png", "jpeg", "webp"] = Field("png", description="The images' format (jpeg is the fastest to encode).")
    output_compression: int = Field(100, ge=0, le=100, description="jpeg and webp quality, 0-100 (100: the best); png ignores it.")
    seed: int | None = Field(None, ge=0, lt=SEED_MODULUS,
                             description="Extension: image i uses seed + i; the same prompt and seed give the same image.")
    user: str | None = Field(None, description="Accepted for compatibility; unused.")


class GeneratedImage(BaseModel):
    b64_json: str
    revised_prompt: str | None = None
    seed: int


class ImagesResponse(BaseModel):
    created: int
    data: list[GeneratedImage]
    output_format: str = "png"


class GenerateRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    prompt: str
    seed: int | None = Field(None, ge=0, lt=SEED_MODULUS)
    size: str | None = None
    output_format: Literal["png", "jpeg", "webp"] = "png"
    output_compression: int = Field(100, ge=0, le=100)


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str = "dmd-ray"


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]


class Health(BaseModel):
    status: Literal["ok"]
    model: str
    device: str
    dtype: str
    batches: int = Field(description="Batches this replica has generated")
    mean_batch_images: float = Field(description="Images per batch, on average: how well requests are batched")
    mean_batch_ms: float = Field(description="Time to generate one batch, on average")


ERROR_RESPONSES = {status: {"model": ErrorResponse} for status in (400, 401, 404, 429, 503, 504)}


def error_response(status: int, message: str, error_type: str = "invalid_request_error", param: str | None = None,
                   code: str | None = None, headers: dict | None = None) -> JSONResponse:
    return JSONResponse(openai_error(message, error_type, param, code), status_code=status, headers=headers)


async def authorize(request: Request, credentials: HTTPAuthorizationCredentials | None = Depends(bearer_scheme)) -> None:
    """Bearer-token check against the key the replica read from its environment (none: open). A dependency, so
    that it runs before the body is checked against the schema: without the key, a caller learns nothing but 401
    (malformed JSON excepted, which FastAPI rejects first)."""
    expected: str | None = request.app.state.api_key
    if expected is None:
        return
    given = credentials.credentials if credentials is not None else ""
    if not hmac.compare_digest(given.encode(), expected.encode()):
        message = "Incorrect API key provided." if given else "Missing API key: send 'Authorization: Bearer <key>'."
        raise RequestError(message, status=401, code="invalid_api_key")


AUTHORIZED = [Depends(authorize)]
api.state.api_key = None


@api.exception_handler(RequestError)
async def _request_error(request: Request, exc: RequestError) -> JSONResponse:
    headers = {"WWW-Authenticate": "Bearer"} if exc.status == 401 else None
    return error_response(exc.status, exc.message, exc.error_type, exc.param, exc.code, headers)


@api.exception_handler(RequestValidationError)
async def _validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
    """Schema violations (wrong types, missing fields, malformed JSON) are 400s naming the parameter, as OpenAI
    answers them, rather than FastAPI's 422."""
    errors = exc.errors()
    first = errors[0] if errors else {}
    location = [str(part) for part in first.get("loc", ()) if part != "body"]
    param = ".".join(location) or None
    message = first.get("msg", "invalid request")
    if first.get("type") == "extra_forbidden":
        message = f"Unrecognized request argument supplied: {param}"
    elif param:
        message = f"'{param}': {message}"
    else:
        message = f"The request body must be a JSON object matching the schema: {message}"
    return error_response(400, message, param=param, code=first.get("type"))


@api.exception_handler(StarletteHTTPException)
async def _http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
    """Unknown routes (404), wrong methods (405) and the like, in the same error format."""
    error_type = "invalid_request_error" if exc.status_code < 500 else "server_error"
    return error_response(exc.status_code, str(exc.detail), error_type, headers=getattr(exc, "headers", None))


@api.exception_handler(Exception)
async def _unexpected_error(request: Request, exc: Exception) -> JSONResponse:
    logger.exception("request to %s failed", request.url.path)  # the path only: bodies may hold private prompts
    return error_response(500, "internal server error", "server_error")


# --------------------------------------------------------------------------------------------- batching
def _count_images(jobs: list[GenerationJob]) -> int:
    return sum(job.num_images for job in jobs)


class DeviceImages(NamedTuple):
    """A job's images still on the GPU ([n, 3, H, W] uint8), with the event recorded on the generator's stream after
    them. The generator thread returns before the GPU has drawn them (it goes on to queue the next batch), so whoever
    reads them on another stream or thread waits for `ready` first."""

    tensor: "torch.Tensor"
    ready: "torch.cuda.Event"

    def to_host(self) -> np.ndarray:
        self.ready.synchronize()
        return self.tensor.permute(0, 2, 3, 1).cpu().numpy()


def _own_cuda_stream(device: str) -> None:
    """The generate thread's initializer: its CUDA work goes to a stream of its own. On the legacy default stream,
    nvJPEG's last copy (torchvision runs it there) and the encoder's copies to the host would queue behind the next
    batch's networks."""
    import torch

    if torch.device(device).type == "cuda":
        torch.cuda.set_stream(torch.cuda.Stream(device))


class BatchedGenerator:
    """A generator behind Serve's dynamic batching, run one batch at a time in a worker thread.

    `@serve.batch` gathers concurrent `generate` calls for up to `batch_wait_timeout_s` (at most `max_batch_size`
    images). It forms each batch as soon as that wait ends, even while the previous batch is still generating, so
    on a busy replica its batches stay small (one or two requests, measured) and queue up behind one another. So
    the gathered jobs go into a pending queue instead, and whenever the generator is free it takes everything
    pending, up to `max_batch_size` images: idle, a request waits at most the batching window (none after a batch of
    one image); busy, the next batch is as full as the backlog allows.

    Works outside a replica too (the benchmark's bare baseline). Serve's batch queue belongs to the method, so one
    instance per process.
    """

    def __init__(self, generator: OneStepImageGenerator, max_batch_size: int, batch_wait_timeout_s: float, on_device: bool = False,
                 max_batches_in_flight: int = 0):
        self.generator = generator
        self.on_device = on_device  # images stay on the generator's device as uint8 tensors (for ImageEncoder)
        self.max_batches_in_flight = max_batches_in_flight  # with on_device; 0: no bound (ServiceConfig says why)
        self._in_flight: collections.deque = collections.deque()  # the ready events of batches queued on the GPU
        # one thread runs every batch (and the warm-up): CUDA graphs recorded in one thread replay in that thread only
        self.thread = ThreadPoolExecutor(max_workers=1, thread_name_prefix="generate", initializer=_own_cuda_stream,
                                         initargs=(str(generator.device),))
        self.max_batch_size = max_batch_size
        self.batch_wait_timeout_s = batch_wait_timeout_s
        self._gather.set_max_batch_size(max_batch_size)
        self._gather.set_batch_wait_timeout_s(batch_wait_timeout_s)
        self._pending: collections.deque[tuple[GenerationJob, asyncio.Future]] = collections.deque()
        self._worker: asyncio.Task | None = None
        self.consecutive_failures = 0
        self.batches_run = 0
        self.images_generated = 0
        self.generation_seconds = 0.0

    async def generate(self, job: GenerationJob) -> np.ndarray | DeviceImages:
        """[n, H, W, 3] uint8 images for one job (DeviceImages with `on_device`). Cancelling the caller (a timeout)
        drops the job if it has not started: the cancellation reaches the awaited future, which the worker skips."""
        result = await self._gather(job)
        return await result

    @serve.batch(max_batch_size=8, batch_wait_timeout_s=0.005, batch_size_fn=_count_images)
    async def _gather(self, jobs: list[GenerationJob]) -> list[asyncio.Future]:
        loop = asyncio.get_running_loop()
        futures = [loop.create_future() for _ in jobs]
        self._pending.extend(zip(jobs, futures))
        if self._worker is None or self._worker.done():
            self._worker = asyncio.create_task(self._generate_pending())
        return futures

    async def _generate_pending(self) -> None:
        while self._pending:
            batch: list[tuple[GenerationJob, asyncio.Future]] = []
            images = 0
            while self._pending and images + self._pending[0][0].num_images <= self.max_batch_size:
                job, future = self._pending.popleft()
                if not future.cancelled():
                    batch.append((job, future))
                    images += job.num_images
            if batch:
                await self._run([job for job, _ in batch], [future for _, future in batch])

    async def _run(self, jobs: list[GenerationJob], futures: list[asyncio.Future]) -> None:
        started = time.perf_counter()
        try:
            results = await asyncio.get_running_loop().run_in_executor(self.thread, self._generate_batch, jobs)
        except Exception as e:
            self.consecutive_failures += 1
            for future in futures:
                if not future.done():
                    future.set_exception(e)
            return
        self.consecutive_failures = 0
        self.batches_run += 1
        self.images_generated += _count_images(jobs)
        # Wait for a batch to fill only under load: after a batch of one image the next request is generated at once
        # (a lone client's latency is then one batch wait shorter), after a larger one the wait gathers the clients
        # that answered together (without it closed-loop clients split into alternating half batches: measured).
        self._gather.set_batch_wait_timeout_s(self.batch_wait_timeout_s if _count_images(jobs) > 1 else 0.0)
        self.generation_seconds += time.perf_counter() - started
        for future, result in zip(futures, results):
            if not future.done():
                future.set_result(result)

    def _generate_batch(self, jobs: list[GenerationJob]) -> list:
        results = self.generator.generate(jobs, self.on_device)
        if self.on_device:
            import torch

            ready = torch.cuda.Event()
            ready.record()  # on this thread's stream, after the batch
            results = [DeviceImages(images, ready) for images in results]
            if self.max_batches_in_flight:
                self._in_flight.append(ready)
                while len(self._in_flight) >= self.max_batches_in_flight:  # then at most bound - 1 (this one too): the next makes the bound
                    self._in_flight.popleft().synchronize()
        return results


class ImageEncoder:
    """Encodes a job's images off the event loop and off the generator's path: JPEG of images still on a GPU with
    torchvision's nvJPEG (batched, on the device), everything else with PIL in a thread pool, one image per thread
    (PIL's zlib, libjpeg and libwebp release the GIL). A 512x512 PNG costs ~55 ms of CPU at level 1, JPEG a few."""

    def __init__(self, threads: int):
        self.pool = ThreadPoolExecutor(max_workers=max(1, threads), thread_name_prefix="encode")

    async def encode(self, images, output_format: str, quality: int) -> list[bytes]:
        """`images`: [n, H, W, 3] uint8 array, [n, 3, H, W] uint8 CPU tensor, or DeviceImages (a GPU replica's)."""
        if isinstance(images, DeviceImages):
            if output_format == "jpeg":
                return await asyncio.to_thread(_nvjpeg, images, quality)
            images = await asyncio.to_thread(images.to_host)
        elif not isinstance(images, np.ndarray):
            images = images.permute(0, 2, 3, 1).numpy()
        loop = asyncio.get_running_loop()
        return list(await asyncio.gather(*(loop.run_in_executor(self.pool, encode_image, image, output_format, quality) for image in images)))


class ServerTiming:
    """The Server-Timing header of a generation: each phase's milliseconds, then `handler`, the handler's whole time
    up to the last phase (what the replica's code spent; the rest of a client's latency is the HTTP proxy's, Ray's
    and FastAPI's). Browsers show it in their network panel; the page and bench_serve read it."""

    def __init__(self, started: float):
        self.started = self.last = started
        self.phases: list[tuple[str, float]] = []

    def mark(self, phase: str) -> None:
        now = time.perf_counter()
        self.phases.append((phase, now - self.last))
        self.last = now

    def durations_ms(self) -> dict[str, float]:
        return {name: seconds * 1e3 for name, seconds in [*self.phases, ("handler", self.last - self.started)]}

    def header(self) -> str:
        return ", ".join(f"{name};dur={ms:.1f}" for name, ms in self.durations_ms().items())

    @staticmethod
    def parse(header: str) -> dict[str, float]:
        """{name: milliseconds} of a Server-Timing header (entries without a duration are left out)."""
        entries = (entry.split(";") for entry in header.split(",") if entry.strip())
        return {fields[0].strip(): float(param.split("=", 1)[1]) for fields in entries for param in fields[1:] if param.strip().startswith("dur=")}


def _nvjpeg(images: DeviceImages, quality: int) -> list[bytes]:
    from torchvision.io import encode_jpeg

    # torchvision encodes on a stream of its own that does not wait for the one the images were drawn on
    images.ready.synchronize()
    return [bytes(data.cpu().numpy()) for data in encode_jpeg(list(images.tensor), quality=max(1, quality))]


# --------------------------------------------------------------------------------------------- the deployment
def served_model_name(config: ServiceConfig) -> str:
    if config.model_name:
        return config.model_name
    if config.model in resolve.BUILT_IN_GENERATORS:
        return config.model
    return config.model.rstrip("/").rsplit("/", 1)[-1] or config.model


# Serve pickles the deployment class by value when it is decorated, with the module's globals as they are then:
# everything its methods use must be defined above this line.
@serve.deployment
@serve.ingress(api)
class OneStepImageService:
    def __init__(self, config: ServiceConfig):
        import ray
        import torch

        self.config = config
        api.state.api_key = os.environ.get(config.api_key_env) or None  # read once; never logged
        device = "cuda" if ray.get_gpu_ids() else "cpu"
        if device == "cuda" and not torch.cuda.is_available():
            raise RuntimeError("Ray assigned this replica a GPU, but torch cannot use CUDA here (a CPU-only torch?)")
        if device == "cpu":
            torch.set_num_threads(max(1, int(config.num_cpus)))
        folder = resolve.resolve_generator(config.model, config.cache_dir or None)
        self.generator = OneStepImageGenerator(folder, device, config.dtype, config.decoder, config.cache_dir or None, config.compile_mode(device))
        sizes = tuple(ImageSize.parse(s) for s in config.sizes) or (self.generator.native_size,)
        for size in sizes:
            self.generator.check_size(size)
        self.limits = RequestLimits(config.max_prompt_chars, config.max_images, sizes)
        self.model_id = served_model_name(config)
        self.model_created = int(os.path.getmtime(os.path.join(folder, "dmd_ray.json")))
        self.batcher = BatchedGenerator(self.generator, config.max_batch_size, config.batch_wait_timeout_s, on_device=device == "cuda",
                                        max_batches_in_flight=config.max_batches_in_flight)
        if config.warmup:  # in the batcher's thread, where the compiled graphs will replay
            started = time.perf_counter()
            cached = bool(self.generator.compile_mode) and compile_cache.load(config.compile_cache)
            self.batcher.thread.submit(self.generator.warmup, config.max_batch_size, sizes).result()
            saved = compile_cache.save(config.compile_cache) if self.generator.compile_mode and not cached else 0
            logger.info("warm-up took %.1f s (compile: %s; compile cache %s)", time.perf_counter() - started, self.generator.compile_mode or "off",
                        "loaded" if cached else f"written, {saved / 2**20:.1f} MiB" if saved else "off")
        self.encoder = ImageEncoder(config.encode_threads or max(2, int(config.num_cpus)))
        logger.info("serving %s (%s) on %s in %s; sizes %s; auth %s", self.model_id, config.model, device,
                    self.generator.dtype, ", ".join(map(str, sizes)), "on" if api.state.api_key else "off")

    def check_health(self) -> None:
        """Serve's periodic health check: a replica whose batches keep failing is replaced."""
        if self.batcher.consecutive_failures >= UNHEALTHY_AFTER_FAILED_BATCHES:
            raise RuntimeError(f"the last {self.batcher.consecutive_failures} batches failed")

    # ----------------------------------------------------------------------------------------- helpers
    async def _generate(self, job: GenerationJob):
        try:
            return await asyncio.wait_for(self.batcher.generate(job), timeout=self.config.request_timeout_s)
        except asyncio.TimeoutError:
            raise RequestError(f"generation did not finish within {self.config.request_timeout_s:g} s", status=504,
                               code="timeout", error_type="server_error") from None

    async def _generate_and_encode(self, job: GenerationJob, output_format: str, quality: int, arrived: float) -> tuple[list[bytes], ServerTiming]:
        timing = ServerTiming(arrived)
        images = await self._generate(job)
        timing.mark("generate")
        encoded = await self.encoder.encode(images, output_format, quality)
        timing.mark("encode")
        return encoded, timing

    # ----------------------------------------------------------------------------------------- routes
    @api.post("/v1/images/generations", response_model=ImagesResponse, responses=ERROR_RESPONSES, dependencies=AUTHORIZED)
    async def create_images(self, body: ImageGenerationRequest, response: Response) -> ImagesResponse:
        """Generates images from a prompt (OpenAI's images API; `seed` is an extension). Header: Server-Timing, as
        /generate's."""
        arrived = time.perf_counter()
        if body.model is not None and body.model != self.model_id:
            raise RequestError(f"The model '{body.model}' does not exist; this server serves '{self.model_id}'.",
                               "model", status=404, code="model_not_found")
        if body.response_format == "url":
            raise RequestError("response_format 'url' is not supported: this server returns images inline; use 'b64_json'.",
                               "response_format", code="unsupported_response_format")
        job = validate_generation(body.prompt, body.n, body.size, body.seed, self.limits)
        encoded, timing = await self._generate_and_encode(job, body.output_format, body.output_compression, arrived)
        data = [GeneratedImage(b64_json=base64.b64encode(image).decode(), seed=seed) for image, seed in zip(encoded, job.seeds)]
        response.headers["Server-Timing"] = timing.header()
        return ImagesResponse(created=int(time.time()), data=data, output_format=body.output_format)

    @api.post("/generate", response_class=Response, responses={200: {"content": {t: {} for t in MEDIA_TYPES.values()}}, **ERROR_RESPONSES},
              dependencies=AUTHORIZED)
    async def generate_one(self, body: GenerateRequest) -> Response:
        """One image as image/png (or output_format jpeg or webp). Headers: X-Seed (the seed used) and Server-Timing
        (generate: batching wait and generation; encode; handler: from the handler's start to the encoded image, so
        that a client's latency minus it is what the HTTP proxy, Ray and FastAPI add)."""
        arrived = time.perf_counter()
        job = validate_generation(body.prompt, 1, body.size, body.seed, self.limits)
        (encoded,), timing = await self._generate_and_encode(job, body.output_format, body.output_compression, arrived)
        headers = {"X-Seed": str(job.seeds[0]), "Server-Timing": timing.header(), "Cache-Control": "no-store"}
        return Response(encoded, media_type=MEDIA_TYPES[body.output_format], headers=headers)

    @api.get("/v1/models", response_model=ModelList, responses=ERROR_RESPONSES, dependencies=AUTHORIZED)
    async def list_models(self) -> ModelList:
        return ModelList(data=[ModelCard(id=self.model_id, created=self.model_created)])

    @api.get("/v1/models/{model_id:path}", response_model=ModelCard, responses=ERROR_RESPONSES, dependencies=AUTHORIZED)
    async def retrieve_model(self, model_id: str) -> ModelCard:
        if model_id != self.model_id:
            raise RequestError(f"The model '{model_id}' does not exist.", "model", status=404, code="model_not_found")
        return ModelCard(id=self.model_id, created=self.model_created)

    @api.get("/health", response_model=Health)
    async def health(self) -> Health:
        """200 while this replica serves; for load balancers (Serve replaces failed replicas by itself)."""
        batcher = self.batcher
        return Health(status="ok", model=self.model_id, device=str(self.generator.device),
                      dtype=str(self.generator.dtype).removeprefix("torch."), batches=batcher.batches_run,
                      mean_batch_images=batcher.images_generated / max(1, batcher.batches_run),
                      mean_batch_ms=1e3 * batcher.generation_seconds / max(1, batcher.batches_run))

    @api.get("/", response_class=HTMLResponse, include_in_schema=False)
    async def page(self) -> HTMLResponse:
        return HTMLResponse(PAGE_PATH.read_text(), headers={"Cache-Control": "no-cache"})


# --------------------------------------------------------------------------------------------- building
def cluster_has_gpus() -> bool:
    import ray

    if ray.is_initialized():
        return ray.cluster_resources().get("GPU", 0) > 0
    import torch  # `serve run module:build_app` builds before it connects to Ray: judge by this machine

    return torch.cuda.is_available()


def build_deployment(config: ServiceConfig):
    """The configured deployment, to be bound to `config` (tests add actor options, e.g. an API key's environment)."""
    from ray.serve.config import AutoscalingConfig, BackpressureConfig

    use_gpu = config.accelerator == "gpu" or (config.accelerator == "auto" and cluster_has_gpus())
    actor_options = {"num_cpus": config.num_cpus, "num_gpus": config.num_gpus if use_gpu else 0}
    if config.inline_response_kib:  # read by the replica's Ray core worker at start; merged with the app's runtime_env
        actor_options["runtime_env"] = {"env_vars": {"RAY_max_direct_call_object_size": str(config.inline_response_kib * 1024)}}
    return OneStepImageService.options(
        ray_actor_options=actor_options,
        max_ongoing_requests=config.max_ongoing_requests,
        max_queued_requests=config.max_queued_requests,
        backpressure_config=BackpressureConfig(status_code=config.overload_status_code, retry_after_s=config.retry_after_s),
        autoscaling_config=AutoscalingConfig(**config.autoscaling_config),
        health_check_period_s=config.health_check_period_s,
        health_check_timeout_s=config.health_check_timeout_s,
        # a generator that cannot load (missing files, no memory) will not load on the 20th try either
        max_constructor_retry_count=3,
    )


def build_app(args: dict | None = None):
    """Ray Serve's application builder: `args` are the keys of ServiceConfig (serve/config.yaml's `args:`)."""
    config = ServiceConfig.from_args(args)
    resolve.check_generator_spec(config.model)  # a misspelt built-in name fails here, not in every replica
    if config.model in resolve.BUILT_IN_GENERATORS:  # and so does a packaged multi-step one (demo-4step)
        refuse_multi_step(resolve.read_generator_info(resolve.BUILT_IN_GENERATORS[config.model]), config.model)
    return build_deployment(config).bind(config)
