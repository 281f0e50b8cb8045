"""Local paths and s3:// URIs behind one pyarrow filesystem API.

S3 goes through the standard AWS configuration: credentials from the default chain (environment, ~/.aws files,
instance profile), region from AWS_REGION / AWS_DEFAULT_REGION, and S3-compatible stores (MinIO, moto, R2, ...)
through AWS_ENDPOINT_URL_S3 or AWS_ENDPOINT_URL. pyarrow's S3FileSystem() ignores AWS_ENDPOINT_URL, so this
module builds one explicit filesystem from the environment and everything (Ray Data, Ray Train, our own reads and
writes) gets that same object.
"""
from __future__ import annotations

import os
import posixpath
import shutil
import tempfile
import uuid
from typing import Callable
from urllib.parse import urlparse

import pyarrow.fs as pafs


class StorageError(RuntimeError):
    """A storage location that cannot be used, with the reason in words."""


def is_s3(uri: str) -> bool:
    return str(uri).startswith("s3://")


def _endpoint() -> str | None:
    return os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL")


def _region() -> str:
    return os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION") or "us-east-1"


def s3_filesystem() -> pafs.S3FileSystem:
    """pyarrow's S3 filesystem configured from the standard AWS environment (endpoint included)."""
    kwargs: dict = {"region": _region(), "connect_timeout": 10, "request_timeout": 60}
    endpoint = _endpoint()
    if endpoint:
        parsed = urlparse(endpoint if "://" in endpoint else f"https://{endpoint}")
        kwargs["endpoint_override"] = parsed.netloc
        kwargs["scheme"] = parsed.scheme
    if os.environ.get("AWS_ACCESS_KEY_ID") and os.environ.get("AWS_SECRET_ACCESS_KEY"):
        kwargs.update(
            access_key=os.environ["AWS_ACCESS_KEY_ID"],
            secret_key=os.environ["AWS_SECRET_ACCESS_KEY"],
            session_token=os.environ.get("AWS_SESSION_TOKEN"),
        )
    return pafs.S3FileSystem(**kwargs)


def boto3_client():
    """A boto3 S3 client; boto3 reads the same environment (AWS_ENDPOINT_URL_S3 / AWS_ENDPOINT_URL included)."""
    import boto3

    return boto3.client("s3", region_name=_region(), endpoint_url=_endpoint())


def resolve(uri: str) -> tuple[pafs.FileSystem, str]:
    """(filesystem, path inside it) for a local path or an s3://bucket/key URI."""
    uri = str(uri)
    if is_s3(uri):
        path = uri[len("s3://") :].strip("/")
        if not path:
            raise StorageError(f"{uri!r} names no bucket")
        return s3_filesystem(), path
    if "://" in uri and not uri.startswith("file://"):
        raise StorageError(f"unsupported storage URI {uri!r}: use a local path or s3://bucket/prefix")
    return pafs.LocalFileSystem(), os.path.abspath(local_path(uri))


def local_path(uri: str) -> str:
    """A local path or file:// URI as a plain path (with ~ expanded)."""
    return os.path.expanduser(uri[len("file://") :] if uri.startswith("file://") else uri)


def absolute(uri: str, only_if_exists: bool = False) -> str:
    """A local path made absolute against this process's working directory; s3:// URIs and "" unchanged.

    Jobs call it on every path before handing it to Ray workers and actors, which run in other directories. With
    `only_if_exists`, specs that may name something else (a built-in model, a hub id) are changed only when they
    are an existing local path.
    """
    if not uri or is_s3(uri):
        return uri
    local = local_path(uri)
    if only_if_exists and not os.path.exists(local):
        return uri
    return os.path.abspath(local)


def join(uri: str, *parts: str) -> str:
    if is_s3(uri):
        return "s3://" + posixpath.join(uri[len("s3://") :].rstrip("/"), *parts)
    return os.path.join(uri, *parts)


def exists(uri: str) -> bool:
    fs, path = resolve(uri)
    return fs.get_file_info(path).type != pafs.FileType.NotFound


def read_bytes(uri: str) -> bytes:
    fs, path = resolve(uri)
    with fs.open_input_stream(path) as f:
        return f.read()


def write_atomic(uri: str, write: Callable[[pafs.FileSystem, str], None]) -> None:
    """Writes a file so that no reader ever sees it half-written.

    Locally: `write` fills a hidden temporary file beside the target, which is then renamed over it. On S3 an object
    becomes visible only when its upload completes, so `write` writes the target directly.
    """
    fs, path = resolve(uri)
    if is_s3(uri):
        write(fs, path)
        return
    os.makedirs(os.path.dirname(path), exist_ok=True)
    tmp = os.path.join(os.path.dirname(path), f".{os.path.basename(path)}.{uuid.uuid4().hex}.tmp")
    try:
        write(fs, tmp)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def write_bytes(uri: str, data: bytes) -> None:
    def _write(fs: pafs.FileSystem, path: str) -> None:
        with fs.open_output_stream(path) as f:
            f.write(data)

    write_atomic(uri, _write)


def list_files(uri: str, folders: bool = False) -> list[str]:
    """Names (relative to `uri`) of the files (or, with `folders`, the sub-folders) directly under a folder or
    prefix; [] if it does not exist."""
    fs, path = resolve(uri)
    infos = fs.get_file_info(pafs.FileSelector(path, allow_not_found=True, recursive=False))
    wanted = pafs.FileType.Directory if folders else pafs.FileType.File
    return sorted(posixpath.basename(i.path) for i in infos if i.type == wanted)


def delete_file(uri: str) -> None:
    fs, path = resolve(uri)
    fs.delete_file(path)


def check_access(uri: str, write: bool = True) -> None:
    """Fails early, with the reason in words, when `uri` cannot be read (or written, with `write`)."""
    if not is_s3(uri):
        _, path = resolve(uri)
        if write:
            try:
                os.makedirs(path, exist_ok=True)
                with tempfile.NamedTemporaryFile(dir=path, prefix=".write-check-"):
                    pass
            except OSError as e:
                raise StorageError(f"cannot write to {uri!r}: {e.strerror or e}") from None
        elif not os.path.exists(path):
            raise StorageError(f"{uri!r} does not exist")
        return

    import botocore.exceptions

    bucket = uri[len("s3://") :].split("/", 1)[0]
    try:
        boto3_client().head_bucket(Bucket=bucket)
    except botocore.exceptions.NoCredentialsError:
        raise StorageError(f"no AWS credentials found for {uri!r}: set AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY, a profile or an instance role") from None
    except botocore.exceptions.EndpointConnectionError as e:
        raise StorageError(f"cannot reach the S3 endpoint for {uri!r}: {e}") from None
    except botocore.exceptions.ClientError as e:
        code = str(e.response.get("Error", {}).get("Code", ""))
        if code in ("404", "NoSuchBucket"):
            raise StorageError(f"S3 bucket {bucket!r} does not exist (from {uri!r})") from None
        if code in ("403", "AccessDenied", "InvalidAccessKeyId", "SignatureDoesNotMatch"):
            raise StorageError(f"access to S3 bucket {bucket!r} was denied ({code}): check the AWS credentials and the bucket policy") from None
        raise StorageError(f"S3 bucket {bucket!r} is not usable: {e}") from None


def upload_tree(local_dir: str, uri: str) -> str:
    """Copies every file under a local folder to `uri` (a folder or an s3:// prefix), keeping relative paths; returns
    `uri`. Each file is written atomically; the tree as a whole appears file by file."""
    for dirpath, _, files in os.walk(local_dir):
        for name in files:
            rel = os.path.relpath(os.path.join(dirpath, name), local_dir)
            with open(os.path.join(dirpath, name), "rb") as f:
                write_bytes(join(uri, *rel.split(os.sep)), f.read())
    return uri


def download_prefix(uri: str, local_dir: str, include: Callable[[str], bool] | None = None) -> str:
    """Copies the files under a folder/prefix into `local_dir` (recursively), once and atomically.

    `include(relative_path)` selects what to copy (default: everything). The copy is made in a temporary sibling
    folder and renamed into place, so an interrupted download never leaves a folder that looks complete.
    """
    if os.path.isdir(local_dir):
        return local_dir
    fs, root = resolve(uri)
    infos = [i for i in fs.get_file_info(pafs.FileSelector(root, allow_not_found=True, recursive=True)) if i.type == pafs.FileType.File]
    if include is not None:
        infos = [i for i in infos if include(posixpath.relpath(i.path, root))]
    if not infos:
        raise StorageError(f"nothing to download under {uri!r}")
    os.makedirs(os.path.dirname(os.path.abspath(local_dir)), exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=".download-", dir=os.path.dirname(os.path.abspath(local_dir)))
    try:
        for info in infos:
            dest = os.path.join(tmp, posixpath.relpath(info.path, root))
            os.makedirs(os.path.dirname(dest), exist_ok=True)
            with fs.open_input_stream(info.path) as src, open(dest, "wb") as out:
                shutil.copyfileobj(src, out, length=8 << 20)
        try:
            os.rename(tmp, local_dir)
        except OSError:
            if not os.path.isdir(local_dir):  # another process finished the same download first: keep theirs
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return local_dir
