"""Storage: local paths and s3:// URIs through the same code, against a real S3 server on 127.0.0.1."""
import os

import pytest

from dmd_ray.data import storage


@pytest.fixture(params=["local", "s3"])
def root(request, tmp_path):
    if request.param == "local":
        return str(tmp_path / "root")
    return request.getfixturevalue("s3_bucket") + "/some/prefix"


def test_write_read_list(root):
    storage.write_bytes(storage.join(root, "a.json"), b"{}")
    storage.write_bytes(storage.join(root, "b.bin"), b"x" * 100)
    assert storage.list_files(root) == ["a.json", "b.bin"]
    assert storage.read_bytes(storage.join(root, "b.bin")) == b"x" * 100
    assert storage.exists(storage.join(root, "a.json")) and not storage.exists(storage.join(root, "c"))
    storage.delete_file(storage.join(root, "a.json"))
    assert storage.list_files(root) == ["b.bin"]
    assert storage.list_files(storage.join(root, "missing")) == []


def test_local_atomic_write_leaves_nothing_on_failure(tmp_path):
    target = str(tmp_path / "out" / "file.bin")

    def failing(fs, path):
        with fs.open_output_stream(path) as f:
            f.write(b"half")
        raise RuntimeError("crash mid-write")

    with pytest.raises(RuntimeError):
        storage.write_atomic(target, failing)
    assert os.listdir(tmp_path / "out") == []


def test_s3_filesystem_reaches_the_endpoint_it_resolves(s3_bucket, s3_server):
    """The filesystem built from the environment talks to the local server: what it writes, boto3 reads there."""
    fs, path = storage.resolve(s3_bucket + "/x/hello.txt")
    assert path == s3_bucket[len("s3://"):] + "/x/hello.txt"
    with fs.open_output_stream(path) as f:
        f.write(b"through pyarrow")
    body = storage.boto3_client().get_object(Bucket=s3_bucket[len("s3://"):], Key="x/hello.txt")["Body"].read()
    assert body == b"through pyarrow"
    assert storage.boto3_client().meta.endpoint_url == s3_server
    storage.check_access(s3_bucket)  # no error


def test_missing_bucket_is_a_clear_error(s3_server):
    with pytest.raises(storage.StorageError, match="does not exist"):
        storage.check_access("s3://no-such-bucket-here/prefix")


def test_unreachable_endpoint_is_a_clear_error(s3_bucket, monkeypatch):
    monkeypatch.setenv("AWS_ENDPOINT_URL", "http://127.0.0.1:9")
    with pytest.raises(storage.StorageError, match="cannot reach"):
        storage.check_access(s3_bucket)


def test_unwritable_local_path_is_a_clear_error(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    with pytest.raises(storage.StorageError, match="cannot write"):
        storage.check_access(str(blocker / "sub"))


def test_download_prefix_selects_files(s3_bucket, tmp_path):
    for name in ("unet/weights.safetensors", "unet/config.json", "unet/diffusion_pytorch_model.bin", "README.md"):
        storage.write_bytes(f"{s3_bucket}/model/{name}", b"0")
    wanted = lambda rel: rel.endswith((".safetensors", ".json"))  # noqa: E731
    local = storage.download_prefix(s3_bucket + "/model", str(tmp_path / "cache"), wanted)
    assert sorted(os.listdir(local)) == ["unet"]
    assert sorted(os.listdir(os.path.join(local, "unet"))) == ["config.json", "weights.safetensors"]
    assert storage.download_prefix(s3_bucket + "/model", local, wanted) == local  # cached: no second download
    with pytest.raises(storage.StorageError, match="nothing to download"):
        storage.download_prefix(s3_bucket + "/model", str(tmp_path / "cache2"), lambda rel: rel.endswith(".ckpt"))
    assert not os.path.exists(tmp_path / "cache2")


class _DenyingS3(object):
    """An S3 endpoint on 127.0.0.1 that rejects every request's credentials, as AWS does for a wrong key: 403 with
    S3's InvalidAccessKeyId error document (HEAD responses carry no body, so clients see the bare 403)."""

    def __enter__(self):
        import http.server
        import threading

        class Handler(http.server.BaseHTTPRequestHandler):
            def _deny(self):
                body = (b'<?xml version="1.0" encoding="UTF-8"?><Error><Code>InvalidAccessKeyId</Code><Message>The AWS Access '
                        b'Key Id you provided does not exist in our records.</Message></Error>')
                self.send_response(403)
                self.send_header("Content-Type", "application/xml")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                if self.command != "HEAD":
                    self.wfile.write(body)

            do_GET = do_PUT = do_POST = do_HEAD = do_DELETE = _deny

            def log_message(self, *args):
                pass

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        threading.Thread(target=self.server.serve_forever, daemon=True).start()
        return f"http://127.0.0.1:{self.server.server_address[1]}"

    def __exit__(self, *exc):
        self.server.shutdown()
        self.server.server_close()


def test_wrong_credentials_fail_clearly_before_any_sampling(monkeypatch, tmp_path, prompts_file):
    from dmd_ray.config import PairsConfig
    from dmd_ray.distributed.pair_job import prepare

    import boto3

    monkeypatch.setattr(boto3, "DEFAULT_SESSION", None)  # boto3 caches resolved credentials in its default session
    with _DenyingS3() as endpoint:
        monkeypatch.setenv("AWS_ENDPOINT_URL", endpoint)
        monkeypatch.setenv("AWS_ACCESS_KEY_ID", "AKIAWRONGWRONGWRONG0")
        monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "wrong")
        monkeypatch.setenv("AWS_REGION", "us-east-1")
        with pytest.raises(storage.StorageError, match="denied .*check the AWS credentials"):
            storage.check_access("s3://bucket/prefix")
        with pytest.raises(storage.StorageError, match="denied"):
            prepare(PairsConfig(teacher="tiny", prompts=prompts_file, num_pairs=4, out="s3://bucket/pairs"))


def test_missing_credentials_fail_clearly(monkeypatch, tmp_path):
    import boto3

    monkeypatch.setattr(boto3, "DEFAULT_SESSION", None)  # boto3 caches resolved credentials in its default session
    for name in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_PROFILE"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "none"))
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "none"))
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")  # no instance-role lookup from a test
    monkeypatch.setenv("AWS_ENDPOINT_URL", "http://127.0.0.1:9")
    monkeypatch.setenv("AWS_REGION", "us-east-1")
    with pytest.raises(storage.StorageError, match="no AWS credentials found"):
        storage.check_access("s3://bucket/prefix")
