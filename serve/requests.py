"""What one HTTP request may ask for, and its errors in OpenAI's shape: untrusted values in, a GenerationJob out."""
from __future__ import annotations

from dataclasses import dataclass

from dmd_ray.sd.one_step import SEED_MODULUS, GenerationJob, ImageSize, random_seed


@dataclass(frozen=True)
class RequestLimits:
    """What one request may ask for. `sizes[0]` is the default size."""

    max_prompt_chars: int
    max_images: int
    sizes: tuple[ImageSize, ...]

    @property
    def default_size(self) -> ImageSize:
        return self.sizes[0]


class RequestError(ValueError):
    """A request the service refuses, in the shape of OpenAI's error object: HTTP status, message, the parameter
    at fault and a machine-readable code."""

    def __init__(self, message: str, param: str | None = None, status: int = 400, code: str | None = None,
                 error_type: str = "invalid_request_error"):
        super().__init__(message)
        self.message, self.param, self.status, self.code, self.error_type = message, param, status, code, error_type

    def to_json(self) -> dict:
        return openai_error(self.message, self.error_type, self.param, self.code)


def openai_error(message: str, error_type: str = "invalid_request_error", param: str | None = None, code: str | None = None) -> dict:
    """OpenAI's error body: {"error": {"message", "type", "param", "code"}}."""
    return {"error": {"message": message, "type": error_type, "param": param, "code": code}}


def validate_generation(prompt: object, n: object, size: object, seed: object, limits: RequestLimits) -> GenerationJob:
    """A GenerationJob from untrusted values, or a RequestError naming the parameter at fault. `size` and `seed`
    may be None (the default size; a random seed); "auto" means the default size, as in OpenAI's API."""
    if not isinstance(prompt, str):
        raise RequestError("'prompt' must be a string", "prompt")
    if not prompt.strip():
        raise RequestError("'prompt' must not be empty", "prompt")
    if len(prompt) > limits.max_prompt_chars:
        raise RequestError(f"'prompt' is {len(prompt)} characters long; the limit is {limits.max_prompt_chars}", "prompt", code="string_above_max_length")
    if isinstance(n, bool) or not isinstance(n, int):
        raise RequestError("'n' must be an integer", "n")
    if not 1 <= n <= limits.max_images:
        raise RequestError(f"'n' is {n}; it must be between 1 and {limits.max_images}", "n", code="integer_out_of_range")
    allowed = ", ".join(map(str, limits.sizes))
    if size is None or size == "auto":
        image_size = limits.default_size
    else:
        try:
            image_size = ImageSize.parse(size) if isinstance(size, str) else None
        except ValueError:
            image_size = None
        if image_size not in limits.sizes:
            raise RequestError(f"'size' {size!r} is not supported; supported sizes: {allowed}", "size", code="unsupported_size")
    if seed is None:
        seed = random_seed()
    elif isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed < SEED_MODULUS:
        raise RequestError(f"'seed' must be an integer in [0, {SEED_MODULUS - 1}]", "seed")
    return GenerationJob(prompt, tuple((seed + i) % SEED_MODULUS for i in range(n)), image_size)
