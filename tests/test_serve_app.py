"""The Ray Serve application end to end, on the session's local Ray cluster and 127.0.0.1 only.

One main application (API key on) serves the client, schema-fuzzing, auth, browser and replica-kill tests; a second
one, redeployed with other settings, serves the overload, timeout and autoscaling tests. Every load loop is bounded
in requests and in time, and every wait polls with a deadline: this machine may be busy with other work.
"""
import base64
import concurrent.futures
import io
import os
import shutil
import socket
import threading
import time

import numpy as np
import pytest
import requests

from test_serve_core import export_tiny_generator

# Each test, its fixtures included, ends within 10 minutes even if a replica never gets scheduled (serve.run waits).
pytestmark = pytest.mark.timeout(600)

API_KEY = "test-key-not-a-secret"
KEY_ENV = "DMD_SERVE_TEST_API_KEY"
MAIN_APP, AUX_APP = "dmd", "aux"
DEPLOYMENT = "OneStepImageService"
HTTP_TIMEOUT_S = 60  # one request; generous for a loaded 2-core machine, yet bounded


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_until(predicate, timeout_s: float, what: str, interval_s: float = 0.25):
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(interval_s)
    raise AssertionError(f"timed out after {timeout_s:.0f} s waiting for {what}")


def running_replicas(app: str) -> int:
    from ray import serve

    status = serve.status().applications.get(app)
    return status.deployments[DEPLOYMENT].replica_states.get("RUNNING", 0) if status else 0


def deploy(name: str, route_prefix: str, args: dict, env: dict | None = None) -> None:
    """serve.run of the configured app (blocks until its replicas are up), with extra environment variables."""
    from ray import serve

    from serve.app import build_deployment
    from serve.config import ServiceConfig

    config = ServiceConfig.from_args(args)
    deployment = build_deployment(config)
    if env:
        options = deployment.ray_actor_options
        env_vars = {**options.get("runtime_env", {}).get("env_vars", {}), **env}
        deployment = deployment.options(ray_actor_options={**options, "runtime_env": {"env_vars": env_vars}})
    serve.run(deployment.bind(config), name=name, route_prefix=route_prefix)


def auth(key: str = API_KEY) -> dict:
    return {"Authorization": f"Bearer {key}"}


@pytest.fixture(scope="module")
def generator_folder(tmp_path_factory):
    return export_tiny_generator(tmp_path_factory.mktemp("serve-app") / "tiny-generator")


@pytest.fixture(scope="module")
def serve_url(ray_cluster, generator_folder):
    from ray import serve

    port = free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    base = f"http://127.0.0.1:{port}"
    args = {"model": generator_folder, "model_name": "tiny", "max_batch_size": 4, "max_ongoing_requests": 8,
            "max_images": 4, "sizes": ["32x32", "64x64"], "api_key_env": KEY_ENV, "health_check_period_s": 1,
            "autoscaling_config": {"min_replicas": 1, "max_replicas": 1}}
    deploy(MAIN_APP, "/", args, env={KEY_ENV: API_KEY})
    yield base
    serve.shutdown()


# --------------------------------------------------------------------------------------------- the API
def decode_png(b64: str) -> np.ndarray:
    from PIL import Image

    return np.asarray(Image.open(io.BytesIO(base64.b64decode(b64))))


def test_openai_client_generates_through_the_service(serve_url):
    import openai

    from serve.app import ServerTiming

    client = openai.OpenAI(base_url=f"{serve_url}/v1", api_key=API_KEY, max_retries=0, timeout=HTTP_TIMEOUT_S)
    assert [m.id for m in client.models.list()] == ["tiny"]
    result = client.images.generate(model="tiny", prompt="a small red circle", n=2, size="64x64",
                                    response_format="b64_json", extra_body={"seed": 42})
    images = [decode_png(item.b64_json) for item in result.data]
    assert [image.shape for image in images] == [(64, 64, 3)] * 2
    assert [item.model_extra["seed"] for item in result.data] == [42, 43]
    again = client.images.generate(prompt="a small red circle", size="64x64", extra_body={"seed": 43})
    assert np.abs(decode_png(again.data[0].b64_json).astype(int) - images[1].astype(int)).max() <= 1  # seed -> image

    for output_format, magic in (("jpeg", b"\xff\xd8\xff"), ("webp", b"RIFF")):
        result = client.images.generate(prompt="a small red circle", size="64x64", extra_body={"seed": 43, "output_format": output_format, "output_compression": 95})
        data = base64.b64decode(result.data[0].b64_json)
        assert data.startswith(magic) and result.model_dump()["output_format"] == output_format
        decoded = decode_png(result.data[0].b64_json).astype(int)  # the same image, lossy: nearer seed 43's than seed 42's
        assert np.abs(decoded - images[1].astype(int)).mean() < 0.7 * np.abs(decoded - images[0].astype(int)).mean()
    raw = client.images.with_raw_response.generate(prompt="a small red circle", size="64x64", extra_body={"seed": 43})
    timing = ServerTiming.parse(raw.headers["server-timing"])
    assert list(timing) == ["generate", "encode", "handler"] and timing["handler"] >= timing["generate"] + timing["encode"] - 0.2
    with pytest.raises(openai.BadRequestError) as caught:
        client.images.generate(prompt="a small red circle", extra_body={"output_format": "gif"})
    assert caught.value.status_code == 400
    with pytest.raises(openai.BadRequestError) as caught:
        client.images.generate(prompt="a small red circle", n=5)
    assert caught.value.status_code == 400 and caught.value.body["param"] == "n"
    with pytest.raises(openai.NotFoundError):
        client.images.generate(model="dall-e-3", prompt="a small red circle")
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=f"{serve_url}/v1", api_key="wrong", max_retries=0).images.generate(prompt="x")


def test_png_route_health_page_and_schema(serve_url):
    response = requests.post(f"{serve_url}/generate", json={"prompt": "a blue square", "seed": 7}, headers=auth(), timeout=HTTP_TIMEOUT_S)
    assert response.status_code == 200 and response.headers["content-type"] == "image/png"
    assert response.headers["x-seed"] == "7" and "dur=" in response.headers["server-timing"]
    jpeg = requests.post(f"{serve_url}/generate", json={"prompt": "a blue square", "seed": 7, "output_format": "jpeg"}, headers=auth(), timeout=HTTP_TIMEOUT_S)
    assert jpeg.status_code == 200 and jpeg.headers["content-type"] == "image/jpeg" and jpeg.content.startswith(b"\xff\xd8")
    assert "encode;dur=" in jpeg.headers["server-timing"]
    same = requests.post(f"{serve_url}/generate", json={"prompt": "a blue square", "seed": 7}, headers=auth(), timeout=HTTP_TIMEOUT_S)
    assert same.content == response.content  # deterministic: same prompt and seed, same PNG

    health = requests.get(f"{serve_url}/health", timeout=HTTP_TIMEOUT_S)  # no key needed
    assert health.status_code == 200 and health.json()["status"] == "ok" and health.json()["device"] == "cpu"
    page = requests.get(f"{serve_url}/", timeout=HTTP_TIMEOUT_S)
    assert page.status_code == 200 and 'id="prompt"' in page.text and "generate" in page.text
    schema = requests.get(f"{serve_url}/openapi.json", timeout=HTTP_TIMEOUT_S).json()
    assert {"/v1/images/generations", "/v1/models", "/generate", "/health"} <= set(schema["paths"])
    assert "HTTPBearer" in schema["components"]["securitySchemes"]


def test_concurrent_requests_are_batched_and_stay_deterministic(serve_url):
    def generate(seed: int) -> bytes:
        response = requests.post(f"{serve_url}/generate", json={"prompt": "a green ring", "seed": seed}, headers=auth(), timeout=HTTP_TIMEOUT_S)
        assert response.status_code == 200, response.text
        return response.content

    def png(content: bytes) -> np.ndarray:
        from PIL import Image

        return np.asarray(Image.open(io.BytesIO(content))).astype(int)

    alone = {seed: generate(seed) for seed in (100, 105)}
    before = requests.get(f"{serve_url}/health", timeout=HTTP_TIMEOUT_S).json()
    with concurrent.futures.ThreadPoolExecutor(12) as pool:
        together = dict(zip(range(100, 112), pool.map(generate, range(100, 112))))
    after = requests.get(f"{serve_url}/health", timeout=HTTP_TIMEOUT_S).json()
    assert after["batches"] - before["batches"] < 12  # some requests shared a batch
    for seed, content in alone.items():  # batch composition changes an image by rounding at most
        assert np.abs(png(together[seed]) - png(content)).max() <= 1


def test_auth_is_enforced_when_a_key_is_set(serve_url):
    protected = [("post", "/v1/images/generations", {"prompt": "x"}), ("post", "/generate", {"prompt": "x"}),
                 ("get", "/v1/models", None), ("get", "/v1/models/tiny", None),
                 ("post", "/v1/images/generations", {"n": "not even valid"})]  # 401 before the body is judged
    for method, path, body in protected:
        for headers in ({}, auth("wrong"), {"Authorization": API_KEY}):
            response = requests.request(method, serve_url + path, json=body, headers=headers, timeout=HTTP_TIMEOUT_S)
            assert response.status_code == 401, (method, path, headers, response.text)
            assert response.json()["error"]["code"] == "invalid_api_key"
            assert response.headers["www-authenticate"] == "Bearer"
        assert requests.request(method, serve_url + path, json=body, headers=auth(), timeout=HTTP_TIMEOUT_S).status_code in (200, 400)
    for path in ("/health", "/", "/openapi.json", "/docs"):
        assert requests.get(serve_url + path, timeout=HTTP_TIMEOUT_S).status_code == 200


def test_fuzzed_requests_from_the_served_schema_never_get_a_server_error(serve_url):
    """Schemathesis generates valid and invalid requests for every operation of the served OpenAPI schema; none
    may be answered 5xx, and every 4xx carries OpenAI's error JSON."""
    import hypothesis
    import schemathesis

    schema = schemathesis.openapi.from_url(f"{serve_url}/openapi.json", wait_for_schema=30)
    session = requests.Session()
    seen: dict[int, int] = {}

    def check(case) -> None:
        response = case.call(base_url=serve_url, session=session, headers=auth(), timeout=HTTP_TIMEOUT_S)
        seen[response.status_code] = seen.get(response.status_code, 0) + 1
        assert response.status_code < 500, f"{case.method} {case.formatted_path} -> {response.status_code}: {response.text[:300]}"
        if response.status_code >= 400:
            assert set(response.json()["error"]) == {"message", "type", "param", "code"}

    operations = [result.ok() for result in schema.get_all_operations()]
    assert len(operations) >= 5
    for operation in operations:
        for mode in (schemathesis.GenerationMode.POSITIVE, schemathesis.GenerationMode.NEGATIVE):
            examples = 50 if operation.method.upper() == "POST" else 10
            test = hypothesis.settings(max_examples=examples, deadline=None, database=None, derandomize=True,
                                       suppress_health_check=list(hypothesis.HealthCheck))(
                hypothesis.given(case=operation.as_strategy(generation_mode=mode))(check))
            try:
                test()
            except hypothesis.errors.Unsatisfiable:
                # an operation without parameters (GET /health) has no invalid form
                assert mode == schemathesis.GenerationMode.NEGATIVE, operation.label
    assert seen.get(200, 0) > 0 and seen.get(400, 0) > 0, seen  # both valid and invalid requests were made


def browser_executable() -> str | None:
    for name in ("chromium-headless-shell", "chromium", "chromium-browser", "google-chrome"):
        if shutil.which(name):
            return shutil.which(name)
    return None


def test_page_regenerates_the_image_as_the_user_types(serve_url):
    executable = browser_executable()
    if executable is None:
        if os.environ.get("CI"):
            pytest.fail("no headless Chromium found; .ci/run installs Debian's chromium-headless-shell")
        pytest.skip("no headless Chromium on this machine (apt-get install chromium-headless-shell)")
    from playwright.sync_api import sync_playwright

    prompt = "a small red circle on a blue background"
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=executable, headless=True)
        try:
            page = browser.new_page()
            generate_calls = []
            page.on("request", lambda request: generate_calls.append(request) if request.url.endswith("/generate") else None)
            page.goto(serve_url + "/", timeout=HTTP_TIMEOUT_S * 1000)
            page.fill("#api-key", API_KEY)
            page.dispatch_event("#api-key", "change")
            page.locator("#prompt").press_sequentially(prompt, delay=15)
            page.wait_for_function(
                "() => { const img = document.getElementById('image');"
                " return img.src.startsWith('blob:') && img.complete && img.naturalWidth === 32; }",
                timeout=HTTP_TIMEOUT_S * 1000,
            )
            page.wait_for_function(f"() => document.getElementById('image').alt === {prompt!r}", timeout=HTTP_TIMEOUT_S * 1000)
            assert "ms round trip" in page.text_content("#latency")
            assert page.text_content("#error") == ""
            assert 1 <= len(generate_calls) < len(prompt) // 2  # debounced: not one request per keystroke
            assert all('"output_format":"jpeg"' in (request.post_data or "") for request in generate_calls)  # the fastest format
        finally:
            browser.close()


def test_killed_replica_is_replaced_and_requests_succeed_again(serve_url):
    import ray

    def replica_names() -> set[str]:
        return {a["name"] for a in ray.util.list_named_actors(all_namespaces=True) if a["name"].startswith(f"SERVE_REPLICA::{MAIN_APP}#")}

    (victim,) = replica_names()
    ray.kill(ray.get_actor(victim, namespace="serve"), no_restart=True)

    def replaced_and_serving() -> bool:
        if victim in replica_names() or running_replicas(MAIN_APP) != 1:
            return False
        try:
            response = requests.post(f"{serve_url}/v1/images/generations", json={"prompt": "x", "seed": 1}, headers=auth(), timeout=10)
        except requests.RequestException:
            return False
        return response.status_code == 200

    wait_until(replaced_and_serving, 180, "a new replica to replace the killed one and serve")


# --------------------------------------------------------------------------------------------- load and failure
@pytest.fixture(scope="module")
def aux_url(serve_url):
    """A second application beside the main one, redeployed by each test below with the settings it needs."""
    from ray import serve

    yield f"{serve_url}/{AUX_APP}"
    serve.delete(AUX_APP)


def test_overload_is_answered_fast_and_the_service_recovers(aux_url, generator_folder):
    deploy(AUX_APP, f"/{AUX_APP}", {
        "model": generator_folder, "max_batch_size": 1, "max_images": 1, "max_ongoing_requests": 1,
        "max_queued_requests": 1, "overload_status_code": 429, "retry_after_s": 2, "sizes": ["256x256"],
        "autoscaling_config": {"min_replicas": 1, "max_replicas": 1},
    })
    burst = 24
    barrier = threading.Barrier(burst)

    def one_request(_):
        barrier.wait(timeout=30)
        started = time.monotonic()
        response = requests.post(f"{aux_url}/v1/images/generations", json={"prompt": "x"}, timeout=HTTP_TIMEOUT_S)
        return response, time.monotonic() - started

    with concurrent.futures.ThreadPoolExecutor(burst) as pool:
        results = list(pool.map(one_request, range(burst)))
    codes = [response.status_code for response, _ in results]
    rejected = [(response, seconds) for response, seconds in results if response.status_code == 429]
    assert set(codes) <= {200, 429}, codes
    assert rejected and codes.count(200) >= 1, codes
    assert all(response.headers.get("retry-after") == "2" for response, _ in rejected)
    assert max(seconds for _, seconds in rejected) < 5, "overload must be answered at once, not after queueing"
    # recovered: once the burst is over, requests are served again
    response = requests.post(f"{aux_url}/v1/images/generations", json={"prompt": "x"}, timeout=HTTP_TIMEOUT_S)
    assert response.status_code == 200


def test_request_timeout_is_answered_504(aux_url, generator_folder):
    # A lone request waits for a batch that never fills (batch_wait_timeout_s) longer than the request timeout.
    deploy(AUX_APP, f"/{AUX_APP}", {
        "model": generator_folder, "max_batch_size": 2, "max_images": 1, "max_ongoing_requests": 2,
        "batch_wait_timeout_s": 5.0, "request_timeout_s": 0.5, "warmup": False,
        "autoscaling_config": {"min_replicas": 1, "max_replicas": 1},
    })
    started = time.monotonic()
    response = requests.post(f"{aux_url}/generate", json={"prompt": "x"}, timeout=HTTP_TIMEOUT_S)
    assert response.status_code == 504 and response.json()["error"]["code"] == "timeout"
    assert time.monotonic() - started < 4.5


def test_autoscaling_goes_from_one_to_two_replicas_and_back(aux_url, generator_folder):
    deploy(AUX_APP, f"/{AUX_APP}", {
        "model": generator_folder, "max_batch_size": 2, "max_images": 1, "max_ongoing_requests": 4,
        "batch_wait_timeout_s": 0.05,  # requests linger a little: the ongoing count rises with few clients
        "autoscaling_config": {"min_replicas": 1, "max_replicas": 2, "target_ongoing_requests": 1,
                               "upscale_delay_s": 1, "downscale_delay_s": 3, "look_back_period_s": 2,
                               "metrics_interval_s": 0.5},
    })
    assert running_replicas(AUX_APP) == 1
    stop = threading.Event()
    codes: list[int] = []

    def client() -> None:
        session = requests.Session()
        for _ in range(2000):  # bounded in count; the deadline below bounds it in time
            if stop.is_set():
                return
            codes.append(session.post(f"{aux_url}/v1/images/generations", json={"prompt": "x"}, timeout=HTTP_TIMEOUT_S).status_code)

    with concurrent.futures.ThreadPoolExecutor(6) as pool:
        clients = [pool.submit(client) for _ in range(6)]
        try:
            wait_until(lambda: running_replicas(AUX_APP) == 2, 150, "a second replica under load", interval_s=0.5)
        finally:
            stop.set()
        for future in clients:
            future.result(timeout=HTTP_TIMEOUT_S * 2)
    assert codes and set(codes) == {200}, set(codes)
    wait_until(lambda: running_replicas(AUX_APP) == 1, 150, "the scale-down to one replica once idle", interval_s=0.5)
