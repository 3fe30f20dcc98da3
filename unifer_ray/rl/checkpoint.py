"""RLVR checkpoints, local or s3://: one directory per step, and a `latest` file written last.

    <checkpoint_dir>/step_00000040/learner/   every learner rank's training state (model, optimizer, schedule, RNG)
    <checkpoint_dir>/step_00000040/state.json the controller's state: step (= data position), policy version
    <checkpoint_dir>/latest                   "step_00000040", replaced atomically once the step is complete

A crash while a checkpoint is written leaves `latest` on the previous, complete one.
"""

from __future__ import annotations

import json
import posixpath
import re
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path

import pyarrow.fs as pafs

from unifer_ray import storage

LATEST = "latest"
STATE_FILE = "state.json"
LEARNER_DIR = "learner"
# The files of one learner rank: DeepSpeed's `[bf16_]zero_pp_rank_<r>_mp_rank_00_*` and `rng_rank<r>.pt`
# (parallel.RNG_FILE).
RANK_FILE = re.compile(r"(?:zero_pp_rank_|rng_rank)(\d+)[_.]")


@dataclass
class RunState:
    step: int = 0  # steps completed: the next step to run, and the data position (the step's prompts)
    version: int = 0  # the policy version the learners hold (0: the starting checkpoint)
    epoch: int = 0  # where `step` is in the prompt set, for people reading the file
    index: int = 0


@contextmanager
def writable_dir(uri: str) -> Iterator[Path]:
    """A local directory whose files end up at `uri`: the directory itself, or a temporary one uploaded after (each
    file streamed: a rank's optimizer partition is never whole in memory) and deleted."""
    if not storage.is_s3(uri):
        Path(uri).mkdir(parents=True, exist_ok=True)
        yield Path(uri)
        return
    with tempfile.TemporaryDirectory(prefix="rlvr-upload-") as tmp:
        yield Path(tmp)
        storage.copy_tree(tmp, uri)


def rank_files(names: list[str], rank: int) -> list[str]:
    """The files of a learner checkpoint that rank `rank` reads: its own partition (DeepSpeed's `*zero_pp_rank_<r>_*`
    optimizer states and ZeRO-3 model shards, our `rng_rank<r>.pt`) and what every rank reads (ZeRO-2's
    `mp_rank_00_model_states.pt`, DDP's `torch_state.pt`). DeepSpeed loads only its own rank's optimizer partition
    (without `elastic_checkpoint`, which this project never sets)."""
    owners = [RANK_FILE.search(posixpath.basename(name)) for name in names]
    return [name for name, owner in zip(names, owners) if owner is None or int(owner.group(1)) == rank]


@contextmanager
def readable_dir(uri: str, rank: int | None = None) -> Iterator[Path]:
    """The files at `uri` in a local directory: the directory itself, or a temporary download of the files `rank`
    reads (all of them when None), each streamed to disk."""
    if not storage.is_s3(uri):
        if not Path(uri).is_dir():
            raise FileNotFoundError(f"checkpoint directory {uri} does not exist")
        yield Path(uri)
        return
    files = storage.list_files(uri)
    if not files:
        raise FileNotFoundError(f"checkpoint directory {uri} holds no files")
    with tempfile.TemporaryDirectory(prefix="rlvr-download-") as tmp:
        for file in files if rank is None else rank_files(files, rank):
            storage.copy_file(file, Path(tmp) / posixpath.relpath(file, uri))
        yield Path(tmp)


def step_uri(root: str, step: int) -> str:
    return storage.join(root, f"step_{step:08d}")


def learner_uri(step_dir: str) -> str:
    return storage.join(step_dir, LEARNER_DIR)


def commit(root: str, state: RunState, keep: int) -> str:
    """Write the step's state.json, point `latest` at it, and delete all but the newest `keep` checkpoints.

    Call after the learners saved into learner_uri(step_uri(root, state.step)). Returns the step directory.
    """
    directory = step_uri(root, state.step)
    storage.write_text(storage.join(directory, STATE_FILE), json.dumps(asdict(state), indent=2))
    storage.write_text(storage.join(root, LATEST), posixpath.basename(directory))
    for old in step_dirs(root)[:-keep]:
        _remove_tree(old)
    return directory


def latest(root: str) -> tuple[str, RunState] | None:
    """The newest complete checkpoint (its directory and state), or None when `root` has none."""
    pointer = storage.join(root, LATEST)
    if not storage.exists(pointer):
        return None
    directory = storage.join(root, storage.read_text(pointer).strip())
    try:
        state = RunState(**json.loads(storage.read_text(storage.join(directory, STATE_FILE))))
    except (FileNotFoundError, OSError) as exc:
        raise FileNotFoundError(f"{pointer} names {directory}, which has no readable {STATE_FILE}: {exc}") from None
    return directory, state


def step_dirs(root: str) -> list[str]:
    """The step directories under `root`, oldest first."""
    fs, path = storage.filesystem(root)
    if fs.get_file_info(path).type == pafs.FileType.NotFound:
        return []
    infos = fs.get_file_info(pafs.FileSelector(path, recursive=False))
    names = sorted(posixpath.basename(i.path) for i in infos
                   if i.type == pafs.FileType.Directory and posixpath.basename(i.path).startswith("step_"))
    return [storage.join(root, name) for name in names]


def _remove_tree(uri: str) -> None:
    fs, path = storage.filesystem(uri)
    fs.delete_dir(path)
