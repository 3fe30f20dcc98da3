"""Local and s3:// storage through one API, against a real S3 API server on loopback."""

from __future__ import annotations

import pytest

from unifer_ray import storage


@pytest.mark.parametrize("kind", ["local", "s3"])
def test_write_read_list_roundtrip(kind, tmp_path, request):
    base = str(tmp_path) if kind == "local" else request.getfixturevalue("s3_server") + f"/roundtrip-{tmp_path.name}"
    storage.write_text(storage.join(base, "a", "one.jsonl"), '{"x": 1}\n')
    storage.write_bytes(storage.join(base, "a", "b", "two.bin"), b"\x00\x01")
    assert storage.read_text(storage.join(base, "a/one.jsonl")) == '{"x": 1}\n'
    assert storage.read_bytes(storage.join(base, "a/b/two.bin")) == b"\x00\x01"
    assert storage.exists(storage.join(base, "a/one.jsonl"))
    assert not storage.exists(storage.join(base, "a/missing"))
    files = storage.list_files(base, ".jsonl")
    assert files == [storage.join(base, "a/one.jsonl")]
    assert storage.list_files(storage.join(base, "nothing-here")) == []


def test_local_write_is_atomic(tmp_path):
    target = tmp_path / "f.txt"
    storage.write_text(target, "old")
    with pytest.raises(TypeError):
        storage.write_bytes(target, 12345)  # fails inside the write, after the temporary file was opened
    assert target.read_text() == "old"
    assert [p.name for p in tmp_path.iterdir()] == ["f.txt"]  # no temporary file left behind
