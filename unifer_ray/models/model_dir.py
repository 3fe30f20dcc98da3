"""A model as a local directory: engines and trainers read local checkpoints; clusters keep them in S3 or name them by
hub id (`Qwen/Qwen2.5-VL-7B-Instruct`), as transformers and vLLM do.

A hub id resolves through huggingface_hub's `snapshot_download` into its cache (HF_HOME, or HF_HUB_CACHE): with
HF_HUB_OFFLINE=1 from the cache alone. On a cluster every node resolves it into its own cache on local disk, and
huggingface_hub's file locks in that cache keep replicas starting side by side from downloading a file twice.
"""

from __future__ import annotations

import fcntl
import hashlib
import os
import re
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from unifer_ray import storage

# Files that hold weights. Everything else of a checkpoint (configs, tokenizer, processor, chat template) is small.
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".gguf", ".h5", ".msgpack")
HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*/[\w.-]+")


def is_hub_id(model: str) -> bool:
    """Whether `model` names a hub repository ('org/name') rather than a local directory or an s3:// prefix."""
    return bool(HUB_ID.fullmatch(model)) and ".." not in model and not os.path.exists(model)


@contextmanager
def node_lock(path: Path) -> Iterator[None]:
    """An exclusive lock shared by every process of this node (an flock on `path`), released on exit."""
    with open(path, "a") as file:
        fcntl.flock(file, fcntl.LOCK_EX)
        yield


def local_model_dir(model: str, cache_root: str | Path | None = None, *, revision: str | None = None,
                    weights: bool = True) -> str:
    """`model` itself when local; an s3:// prefix is copied below `cache_root` once per node and that copy returned; a
    hub id ('org/name', at `revision`: a branch, tag or commit) is its snapshot directory in the Hugging Face cache.

    `weights=False` fetches every file but the weights (configs, tokenizer, processor, chat template): what a process
    that only formats prompts needs, e.g. a Ray Data worker building requests for a 72B teacher. A full copy already
    on the node serves it too. The first process of a node copies an s3:// prefix (files streamed, never whole in
    memory) under a node-wide lock; the others wait for it and reuse its copy. The copy is renamed into place when
    complete, so a process never loads a half-copied checkpoint.
    """
    if is_hub_id(model):
        return hub_snapshot(model, revision, weights=weights)
    if not storage.is_s3(model):
        return model
    prefix = model.rstrip("/")
    root = Path(cache_root or Path(tempfile.gettempdir()) / "unifer-models")
    full = root / hashlib.sha256(prefix.encode()).hexdigest()[:16]
    target = full if weights else full.with_name(full.name + "-no-weights")
    for ready in (full, target):
        if ready.is_dir():
            return str(ready)
    root.mkdir(parents=True, exist_ok=True)
    with node_lock(root / f".{target.name}.lock"):
        if target.is_dir():  # another process of this node copied it while we waited
            return str(target)
        files = [uri for uri in storage.list_files(prefix) if weights or not uri.endswith(WEIGHT_SUFFIXES)]
        if not files:
            raise FileNotFoundError(f"model {model} holds no files" + ("" if weights else " besides weights"))
        partial = Path(tempfile.mkdtemp(dir=root, prefix=f".{target.name}."))
        try:
            for uri in files:
                storage.copy_file(uri, partial / uri[len(prefix) + 1 :])
            os.rename(partial, target)
        finally:
            shutil.rmtree(partial, ignore_errors=True)
    return str(target)


def hub_snapshot(repo_id: str, revision: str | None = None, *, repo_type: str = "model", weights: bool = True) -> str:
    """The local snapshot directory of a hub repository (a model, or a dataset with repo_type="dataset"),
    downloaded into the cache unless it is there (without weight files when `weights` is False); with
    HF_HUB_OFFLINE=1 the cache alone."""
    from huggingface_hub import snapshot_download
    from huggingface_hub.constants import HF_HUB_CACHE, HF_HUB_OFFLINE
    from huggingface_hub.errors import LocalEntryNotFoundError

    try:
        ignore = None if weights else [f"*{suffix}" for suffix in WEIGHT_SUFFIXES]
        return snapshot_download(repo_id, revision=revision, repo_type=repo_type, ignore_patterns=ignore)
    except LocalEntryNotFoundError as exc:
        mode = "HF_HUB_OFFLINE=1: the cache alone" if HF_HUB_OFFLINE else "the hub was not reachable"
        raise FileNotFoundError(
            f"{repo_type} {repo_id!r}{f' at revision {revision!r}' if revision else ''} is neither a local directory "
            f"nor in the Hugging Face cache {HF_HUB_CACHE} ({mode}): {exc}") from None
