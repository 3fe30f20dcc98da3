"""SFT on a real local Ray cluster with the real tiny model: data parallelism (one worker's run on S3 storage), a
killed worker."""

from __future__ import annotations

import json
import os
import signal
import threading
import time
from pathlib import Path

import psutil
import pytest
import torch
from test_sft import cot_rows

from unifer_ray import storage
from unifer_ray.models.loading import load_model_and_processor
from unifer_ray.runlog import METRICS_FILE
from unifer_ray.train import sft
from unifer_ray.train.config import SFTConfig
from unifer_ray.train.loop import checkpoint_dir_name
from unifer_ray.train.sft import run_sft, training_rows

COT_FIELDS = ("id", "image_path", "question", "response")


@pytest.fixture(scope="module")
def cot_file(synthetic_root, tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("cot") / "cot.jsonl"
    path.write_text("".join(json.dumps({k: r[k] for k in COT_FIELDS}) + "\n" for r in cot_rows(synthetic_root)))
    return path


def sft_config(tiny_model_dir, cot_file, synthetic_root, out: Path, **overrides) -> SFTConfig:
    base = dict(model=str(tiny_model_dir), data=[str(cot_file)], image_root=str(synthetic_root),
                output_dir=str(out / "model"), checkpoint_dir=str(out / "runs" / "sft"), num_workers=1, num_cpus=1,
                strategy="ddp", micro_batch_size=2, grad_accum_steps=2, max_steps=4, image_size=56,
                checkpoint_every=2, optimizer={"lr": 3e-3, "warmup_ratio": 0.25})
    return SFTConfig(**(base | overrides))


def records(config: SFTConfig) -> list[dict]:
    return [json.loads(line) for line in (Path(config.metrics_dir) / METRICS_FILE).read_text().splitlines()]


def test_the_training_order_is_the_rows_not_the_order_they_were_written_in(ray_cluster, tiny_model_dir, cot_file,
                                                                          synthetic_root, tmp_path):
    # The same rows as two shards, written backwards: what a curation run whose tasks end in another order leaves.
    lines = cot_file.read_text().splitlines(keepends=True)[::-1]
    rewritten = tmp_path / "rewritten"
    rewritten.mkdir()
    (rewritten / "b.jsonl").write_text("".join(lines[: len(lines) // 2]))
    (rewritten / "a.jsonl").write_text("".join(lines[len(lines) // 2 :]))

    def order(data: Path, seed: int = 0) -> list[str]:
        config = sft_config(tiny_model_dir, cot_file, synthetic_root, tmp_path, data=[str(data)], seed=seed)
        return [row["id"] for row in training_rows(config).take_all()]

    written = order(cot_file)
    assert order(rewritten) == written
    assert written != sorted(written) and order(cot_file, seed=1) != written  # still the seed's shuffle


def test_two_workers_follow_the_one_worker_loss_curve(s3_server, ray_cluster, tiny_model_dir, cot_file,
                                                      synthetic_root, tmp_path, capfd, monkeypatch):
    # Same global batch of 4 rows: 1 worker × 2 rows × 2 accumulation steps (DDP), 2 workers × 2 rows (ZeRO-3). The
    # one-worker run reads its data from S3 and keeps its checkpoints and model there (one run fewer for the suite).
    base = f"{s3_server}/sft-{tmp_path.name}"
    storage.write_bytes(f"{base}/cot/cot.jsonl", cot_file.read_bytes())
    one = sft_config(tiny_model_dir, cot_file, synthetic_root, tmp_path / "one", strategy="ddp", data=[f"{base}/cot"],
                     checkpoint_dir=f"{base}/runs/sft", output_dir=f"{base}/model", log_dir=str(tmp_path / "logs"))
    two = sft_config(tiny_model_dir, cot_file, synthetic_root, tmp_path / "two", strategy="deepspeed", zero_stage=3,
                     num_workers=2, num_cpus=0.5, grad_accum_steps=1)
    result_one = run_sft(one)
    # Not a terminal: the progress is plain lines (no carriage returns), the last one written as the run ends.
    progress = [line for line in capfd.readouterr().err.split("\n") if line.startswith("sft: ")]
    assert progress and progress[-1].startswith("sft: 4/4 steps (100%)") and "| loss " in progress[-1]
    result_two = run_sft(two)
    assert result_one.steps == result_two.steps == 4

    curve_one, curve_two = records(one), records(two)
    assert [r["step"] for r in curve_one] == [r["step"] for r in curve_two] == [1, 2, 3, 4]
    assert [r["rows"] for r in curve_one] == [r["rows"] for r in curve_two] == [4] * 4
    for a, b in zip(curve_one, curve_two):
        assert b["label_tokens"] == a["label_tokens"]  # the same rows in every step
        # Measured: losses agree to 3e-8, gradient norms (summed in another order) to 2e-6.
        assert b["loss"] == pytest.approx(a["loss"], rel=1e-5)
        assert b["grad_norm"] == pytest.approx(a["grad_norm"], rel=1e-4)
        assert b["lr"] == pytest.approx(a["lr"]) and a["tokens_per_s"] > 0
    assert curve_one[-1]["loss"] < curve_one[0]["loss"]
    assert any((Path(one.metrics_dir) / "tensorboard").iterdir())

    # The model and checkpoints in S3: the exported files are those of a model directory, and load.
    files = storage.list_files(f"{base}/model")
    assert {f.rsplit("/", 1)[1] for f in files} >= {"config.json", "model.safetensors", "tokenizer.json",
                                                   "chat_template.jinja", "generation_config.json"}
    local = tmp_path / "downloaded"
    local.mkdir()
    for uri in files:
        (local / uri.rsplit("/", 1)[1]).write_bytes(storage.read_bytes(uri))
    model_one, processor = load_model_and_processor(local)
    assert processor.tokenizer.convert_tokens_to_ids("<|im_end|>") in model_one.generation_config.eos_token_id
    checkpoint = f"{base}/runs/sft/{checkpoint_dir_name(4)}"
    assert result_one.checkpoint == checkpoint
    assert f"{checkpoint}/train_state.json" in storage.list_files(f"{base}/runs")

    # The exported directories load like any checkpoint, and hold the same weights, element by element up to 1e-4
    # (3% of one step at lr 3e-3). The strategies round differently (the gradient norm that clipping divides by is
    # summed in another order), and Adam, dividing each gradient by its own RMS, amplifies that where a gradient is
    # all but zero: the key biases along RoPE's slowest frequencies shift every key's score alike, which the softmax
    # cancels, so their gradients are 1e-8 to 1e-11 (1e-4 elsewhere). They end up to 1e-5 apart (1e-2 relative).
    model_two, _ = load_model_and_processor(two.output_dir)
    start, _ = load_model_and_processor(tiny_model_dir)
    weights_two = model_two.state_dict()
    for name, value in model_one.state_dict().items():
        torch.testing.assert_close(weights_two[name], value, rtol=1e-3, atol=1e-4)
    assert any(not torch.equal(p, start.state_dict()[n]) for n, p in model_one.state_dict().items())

    # The S3 run again: it finds its finished checkpoint there and trains nothing more, without starting Ray Train
    # (whose trainer is refused here). Its model is exported again, here to a new output_dir.
    def no_trainer(*args, **kwargs):
        raise AssertionError("a finished run started Ray Train")

    monkeypatch.setattr(sft, "TorchTrainer", no_trainer)
    again = run_sft(one.model_copy(update={"output_dir": f"{base}/model-again"}))
    assert (again.steps, again.checkpoint, again.loss) == (result_one.steps, result_one.checkpoint, result_one.loss)
    assert len(records(one)) == 4
    assert [f.rsplit("/", 1)[1] for f in storage.list_files(f"{base}/model-again")] == [
        f.rsplit("/", 1)[1] for f in files]


def _train_worker_pids() -> list[int]:
    """Ray Train worker processes below this test process (its local Ray cluster started them)."""
    pids = []
    for child in psutil.Process().children(recursive=True):
        try:
            if "RayTrainWorker" in " ".join(child.cmdline()):
                pids.append(child.pid)
        except psutil.NoSuchProcess:
            pass
    return pids


def _kill_a_worker_after(step: int, metrics_dir: str, killed: dict) -> None:
    """Wait until `step` is logged, then SIGKILL one Ray Train worker process."""
    path = Path(metrics_dir) / METRICS_FILE
    deadline = time.time() + 300
    while time.time() < deadline:
        lines = path.read_text().splitlines() if path.exists() else []
        if lines and json.loads(lines[-1])["step"] >= step:
            pid = _train_worker_pids()[-1]
            os.kill(pid, signal.SIGKILL)
            killed["pid"] = pid
            return
        time.sleep(0.05)


def test_a_killed_worker_resumes_from_the_last_checkpoint_and_the_best_k_are_kept(ray_cluster, tiny_model_dir,
                                                                                  cot_file, synthetic_root, tmp_path):
    config = sft_config(tiny_model_dir, cot_file, synthetic_root, tmp_path, strategy="deepspeed", zero_stage=2,
                        num_workers=2, num_cpus=0.5, micro_batch_size=1, max_steps=10, checkpoint_every=4,
                        max_failures=1, keep_checkpoints=1)
    killed: dict = {}
    # Killed once step 5 is logged: the next checkpoint (step 8) is three steps away, so the second attempt trains
    # again the steps between the checkpoint it resumes from and the kill.
    killer = threading.Thread(target=_kill_a_worker_after, args=(5, config.metrics_dir, killed), daemon=True)
    killer.start()
    result = run_sft(config)
    killer.join()
    assert killed, "no worker was killed"
    assert result.steps == 10

    history = records(config)
    attempts = sorted({r["start_step"] for r in history})
    assert len(attempts) == 2 and attempts[0] == 0
    resumed_from = attempts[1]
    # The second attempt started from the last checkpoint the first one completed: at most one interval is lost.
    last_before_kill = max(r["step"] for r in history if r["start_step"] == 0)
    assert last_before_kill >= 5
    assert resumed_from == last_before_kill // config.checkpoint_every * config.checkpoint_every
    second = [r for r in history if r["start_step"] == resumed_from]
    assert [r["step"] for r in second] == list(range(resumed_from + 1, 11))
    # Steps trained twice saw the same rows with the same model, optimizer and schedule: the same loss.
    first = {r["step"]: r for r in history if r["start_step"] == 0}
    again = [r for r in second if r["step"] in first]
    assert again, "no step was trained twice: the comparison below would check nothing"
    for r in again:
        assert r["loss"] == pytest.approx(first[r["step"]]["loss"], rel=1e-5)
        assert r["lr"] == pytest.approx(first[r["step"]]["lr"])

    # keep_checkpoints=1: the lowest-loss checkpoint stays, and so does the latest (Ray Train never deletes it);
    # a checkpoint the killed worker left half-written was written again by the second attempt, and pruned with it.
    # The final step's checkpoint is scored too: when its loss is the lowest, it is the only one left.
    loss_at = {r["step"]: r["loss"] for r in history}  # the last record of a step is the one that counts
    checkpointed = {*range(config.checkpoint_every, 11, config.checkpoint_every), 10}
    kept = {min(checkpointed, key=loss_at.get), 10}
    run_dir = Path(config.checkpoint_dir)
    assert {p.name for p in run_dir.glob("checkpoint_*") if p.is_dir()} == {checkpoint_dir_name(s) for s in kept}
    for step in kept:
        assert json.loads((run_dir / checkpoint_dir_name(step) / "train_state.json").read_text()) == {"step": step}
