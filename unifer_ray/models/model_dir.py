"""A model as a local directory: engines and trainers read local checkpoints; clusters keep them in S3 or name them by
hub id (`Qwen/Qwen2.5-VL-7B-Instruct`), as transformers and vLLM do.

A hub id resolves through huggingface_hub's `snapshot_download` into its cache (HF_HOME, or HF_HUB_CACHE): with
HF_HUB_OFFLINE=1 from the cache alone. On a cluster every node resolves it into its own cache on local disk, and
huggingface_hub's file locks in that cache keep replicas starting side by side from downloading a file twice.
"""

from __future__ import annotations

import hashlib
import os
import re
import shutil
import tempfile
from pathlib import Path

from unifer_ray import storage

HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*/[\w.-]+")


def is_hub_id(model: str) -> bool:
    """Whether `model` names a hub repository ('org/name') rather than a local directory or an s3:// prefix."""
    return bool(HUB_ID.fullmatch(model)) and ".." not in model and not os.path.exists(model)


def local_model_dir(model: str, cache_root: str | Path | None = None, *, revision: str | None = None) -> str:
    """`model` itself when local; an s3:// prefix is copied once below `cache_root` and that copy is returned; a
    hub id ('org/name', at `revision`: a branch, tag or commit) is its snapshot directory in the Hugging Face cache.

    An s3:// copy is made in a private directory and renamed into place, so replicas starting side by side on one
    node never load a half-copied checkpoint.
    """
    if is_hub_id(model):
        return hub_snapshot(model, revision)
    if not storage.is_s3(model):
        return model
    prefix = model.rstrip("/")
    root = Path(cache_root or Path(tempfile.gettempdir()) / "unifer-models")
    target = root / hashlib.sha256(prefix.encode()).hexdigest()[:16]
    if target.is_dir():
        return str(target)
    files = storage.list_files(prefix)
    if not files:
        raise FileNotFoundError(f"model {model} holds no files")
    root.mkdir(parents=True, exist_ok=True)
    partial = Path(tempfile.mkdtemp(dir=root, prefix=f".{target.name}."))
    try:
        for uri in files:
            destination = partial / uri[len(prefix) + 1 :]
            destination.parent.mkdir(parents=True, exist_ok=True)
            destination.write_bytes(storage.read_bytes(uri))
        os.rename(partial, target)
    except OSError:
        if not target.is_dir():  # a replica beside us finished first: its copy is as good as ours
            raise
    finally:
        shutil.rmtree(partial, ignore_errors=True)
    return str(target)


def hub_snapshot(repo_id: str, revision: str | None = None, *, repo_type: str = "model") -> str:
    """The local snapshot directory of a hub repository (a model, or a dataset with repo_type="dataset"),
    downloaded into the cache unless it is there; with HF_HUB_OFFLINE=1 the cache alone."""
    from huggingface_hub import snapshot_download
    from huggingface_hub.constants import HF_HUB_CACHE, HF_HUB_OFFLINE
    from huggingface_hub.errors import LocalEntryNotFoundError

    try:
        return snapshot_download(repo_id, revision=revision, repo_type=repo_type)
    except LocalEntryNotFoundError as exc:
        mode = "HF_HUB_OFFLINE=1: the cache alone" if HF_HUB_OFFLINE else "the hub was not reachable"
        raise FileNotFoundError(
            f"{repo_type} {repo_id!r}{f' at revision {revision!r}' if revision else ''} is neither a local directory "
            f"nor in the Hugging Face cache {HF_HUB_CACHE} ({mode}): {exc}") from None
