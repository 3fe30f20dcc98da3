"""Local paths and s3:// URIs behind one small API (PyArrow filesystems), with atomic writes.

S3 endpoints other than AWS (MinIO, a loopback test server) come from AWS_ENDPOINT_URL_S3 or AWS_ENDPOINT_URL,
credentials from the usual AWS variables, as boto3 reads them.
"""

from __future__ import annotations

import os
import posixpath
import tempfile
from pathlib import Path

import pyarrow.fs as pafs


def is_s3(uri: str | Path) -> bool:
    return str(uri).startswith("s3://")


def s3_endpoint() -> str | None:
    return os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL")


def filesystem(uri: str | Path) -> tuple[pafs.FileSystem, str]:
    """The PyArrow filesystem holding `uri`, and the path inside it."""
    uri = str(uri)
    if is_s3(uri):
        endpoint = s3_endpoint()
        fs = pafs.S3FileSystem(
            endpoint_override=endpoint,
            scheme="http" if endpoint and endpoint.startswith("http://") else "https",
            region=os.environ.get("AWS_DEFAULT_REGION", os.environ.get("AWS_REGION", "us-east-1")),
            allow_bucket_creation=True,
        )
        return fs, uri[len("s3://"):].rstrip("/")
    return pafs.LocalFileSystem(), os.path.abspath(uri)


def join(base: str | Path, *parts: str) -> str:
    base = str(base)
    if is_s3(base):
        return "s3://" + posixpath.join(base[len("s3://"):], *[p.lstrip("/") for p in parts])
    return os.path.join(base, *[p.lstrip("/") for p in parts])


def exists(uri: str | Path) -> bool:
    fs, path = filesystem(uri)
    return fs.get_file_info(path).type != pafs.FileType.NotFound


def read_bytes(uri: str | Path) -> bytes:
    fs, path = filesystem(uri)
    with fs.open_input_stream(path) as f:
        return f.read()


def read_text(uri: str | Path) -> str:
    return read_bytes(uri).decode("utf-8")


def makedirs(uri: str | Path) -> None:
    fs, path = filesystem(uri)
    fs.create_dir(path, recursive=True)


def write_bytes(uri: str | Path, data: bytes) -> None:
    """Write all of `data` or nothing: a reader never sees a half-written file."""
    if is_s3(uri):  # an S3 PUT is atomic by itself
        fs, path = filesystem(uri)
        with fs.open_output_stream(path) as f:
            f.write(data)
        return
    path = Path(uri)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.replace(tmp, path)
    except BaseException:
        os.unlink(tmp)
        raise


def write_text(uri: str | Path, text: str) -> None:
    write_bytes(uri, text.encode("utf-8"))


def list_files(uri: str | Path, suffix: str = "") -> list[str]:
    """Files below `uri` (recursively) whose names end with `suffix`, as URIs of the same kind, sorted."""
    fs, path = filesystem(uri)
    if fs.get_file_info(path).type == pafs.FileType.NotFound:
        return []
    infos = fs.get_file_info(pafs.FileSelector(path, recursive=True))
    files = sorted(i.path for i in infos if i.type == pafs.FileType.File and i.path.endswith(suffix))
    return ["s3://" + f for f in files] if is_s3(uri) else files


def copy_file(source: str | Path, target: str | Path) -> None:
    """Copy one file between local paths and s3:// URIs, streamed in chunks (checkpoint shards and model weights are
    tens of GB: never whole in memory). The target appears whole or not at all."""
    source_fs, source_path = filesystem(source)
    if is_s3(target):  # a multipart upload becomes visible when it completes
        target_fs, target_path = filesystem(target)
        pafs.copy_files(source_path, target_path, source_filesystem=source_fs, destination_filesystem=target_fs)
        return
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.", suffix=".tmp")
    os.close(fd)
    try:
        pafs.copy_files(source_path, tmp, source_filesystem=source_fs, destination_filesystem=pafs.LocalFileSystem())
        os.replace(tmp, target)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def copy_tree(local_dir: str | Path, target: str) -> None:
    """Copy a local directory to `target` (local or s3://), file by file, each streamed and atomic."""
    local_dir = Path(local_dir)
    for path in sorted(p for p in local_dir.rglob("*") if p.is_file()):
        copy_file(path, join(target, path.relative_to(local_dir).as_posix()))
