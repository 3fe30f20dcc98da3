"""RLVR checkpoints in local directories and on a loopback S3 server: commit, latest, pruning, round trips."""

from __future__ import annotations

import pytest

from unifer_ray import storage
from unifer_ray.rl.checkpoint import (
    RunState,
    commit,
    latest,
    learner_uri,
    readable_dir,
    step_dirs,
    step_uri,
    writable_dir,
)


@pytest.fixture(params=["local", "s3"])
def root(request, tmp_path):
    if request.param == "local":
        return str(tmp_path / "checkpoints")
    return request.getfixturevalue("s3_server") + f"/rlvr-{tmp_path.name}"


def save_step(root: str, step: int, keep: int) -> None:
    """What the controller does at a checkpoint: learners write their files, then the state is committed."""
    for rank in range(2):
        with writable_dir(learner_uri(step_uri(root, step))) as directory:
            (directory / f"rank{rank}.pt").write_bytes(f"step {step} rank {rank}".encode())
            (directory / "deepspeed").mkdir(exist_ok=True)
            (directory / "deepspeed" / f"optim_{rank}.pt").write_bytes(b"optimizer")
    commit(root, RunState(step=step, version=step, epoch=0, index=step * 8), keep=keep)


def test_latest_is_the_newest_complete_checkpoint_and_old_ones_are_pruned(root):
    assert latest(root) is None
    save_step(root, 2, keep=2)
    save_step(root, 4, keep=2)
    save_step(root, 6, keep=2)
    directory, state = latest(root)
    assert directory == step_uri(root, 6)
    assert (state.step, state.version, state.index) == (6, 6, 48)
    assert step_dirs(root) == [step_uri(root, 4), step_uri(root, 6)]

    with readable_dir(learner_uri(directory)) as local:
        assert (local / "rank1.pt").read_bytes() == b"step 6 rank 1"
        assert (local / "deepspeed" / "optim_0.pt").read_bytes() == b"optimizer"


def test_an_unfinished_checkpoint_is_not_the_latest(root):
    save_step(root, 2, keep=3)
    with writable_dir(learner_uri(step_uri(root, 4))) as directory:  # a crash before commit
        (directory / "rank0.pt").write_bytes(b"half")
    assert latest(root)[1].step == 2


def test_a_dangling_latest_pointer_is_a_clear_error(root):
    storage.write_text(storage.join(root, "latest"), "step_00000009")
    with pytest.raises(FileNotFoundError, match="step_00000009"):
        latest(root)
