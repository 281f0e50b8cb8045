"""Shared fixtures: a real S3-compatible HTTP server on 127.0.0.1 (moto), one Ray cluster per test session."""
import logging
import os
import uuid

import pytest

# Tests never reach the network: no hub downloads, no AWS.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("DS_ACCELERATOR", "cpu")

S3_ENV = {
    "AWS_ACCESS_KEY_ID": "testing",
    "AWS_SECRET_ACCESS_KEY": "testing",
    "AWS_SESSION_TOKEN": "testing",
    "AWS_REGION": "us-east-1",
    "AWS_DEFAULT_REGION": "us-east-1",
}


@pytest.fixture(scope="session")
def s3_server():
    """A moto S3 server on 127.0.0.1 speaking the S3 HTTP protocol; the AWS environment points at it."""
    from moto.server import ThreadedMotoServer

    logging.getLogger("werkzeug").setLevel(logging.WARNING)  # one log line per S3 request otherwise

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    endpoint = f"http://{host}:{port}"
    saved = {k: os.environ.get(k) for k in [*S3_ENV, "AWS_ENDPOINT_URL"]}
    os.environ.update(S3_ENV, AWS_ENDPOINT_URL=endpoint)
    yield endpoint
    server.stop()
    for k, v in saved.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v


@pytest.fixture
def s3_bucket(s3_server):
    """A fresh, empty bucket on the local S3 server; yields its s3:// URI."""
    from dmd_ray.data.storage import boto3_client

    name = f"test-{uuid.uuid4().hex[:12]}"
    boto3_client().create_bucket(Bucket=name)
    yield f"s3://{name}"


@pytest.fixture(scope="session")
def ray_cluster(s3_server):
    """One embedded Ray cluster for the whole test session (no dashboard: it costs ~1 GB of RAM). Started after the
    S3 server so that its workers inherit the AWS environment pointing at it, as a real cluster's nodes would."""
    import ray

    if not ray.is_initialized():
        # more logical CPUs than cores: actor pools must never starve Ray Data's other tasks on a 2-core machine
        ray.init(address="local", include_dashboard=False, num_cpus=6, object_store_memory=512 * 1024**2, log_to_driver=False)
    from ray.data import DataContext

    DataContext.get_current().enable_progress_bars = False
    yield ray
    ray.shutdown()


@pytest.fixture
def prompts_file(tmp_path):
    path = tmp_path / "prompts.txt"
    path.write_text("a small red circle on a blue background\na large green square\n\nthe yellow triangle at the top\n")
    return str(path)


# Tests that start Ray, Serve, a subprocess or a browser are the slow lane (`-m slow`); everything else runs in
# seconds without them (`-m "not slow"`). A test is slow when it asks for one of these fixtures or is marked so.
SLOW_FIXTURES = {"ray_cluster", "serve_url", "aux_url", "local_head"}


def pytest_collection_modifyitems(config, items):
    for item in items:
        if SLOW_FIXTURES & set(getattr(item, "fixturenames", ())):
            item.add_marker(pytest.mark.slow)
