"""The CoT and RLVR pipelines end to end on Ray Data: real synthetic faces, the oracle and the tiny hf teacher,
planted FERBench images, a loopback S3 server, and a resumed interrupted run."""

from __future__ import annotations

import json
import shutil
from collections import Counter
from pathlib import Path

import pyarrow.parquet as pq
import pytest
from datasets import load_dataset

from tests.helpers import VLLM_TEST_KWARGS, needs_vllm
from unifer_ray import storage
from unifer_ray.config import parse_config
from unifer_ray.curate.config import CotSetConfig, CurateSource, RlvrSetConfig
from unifer_ray.curate.cot import curate_cot_set
from unifer_ray.curate.ledger import done_ids
from unifer_ray.curate.rlvr import curate_rlvr_set
from unifer_ray.curate.samples import source_rows
from unifer_ray.data.convert import convert_ferbench
from unifer_ray.data.sources import read_samples
from unifer_ray.data.synthetic import write_synthetic_datasets
from unifer_ray.data.training_sets import read_cot, read_rlvr
from unifer_ray.parsing import parse_strict


def _labels(root: Path, *datasets: tuple[str, str]) -> dict[str, tuple[str, list[str]]]:
    """image_path -> (label, candidates) of the train samples, as the pipelines name image paths."""
    out = {}
    for key, name in datasets:
        for s in read_samples(key, root / name, "train").samples:
            out[f"/{name}/{s.rel_path}"] = (s.label, s.candidate_labels)
    return out


def test_a_fraction_of_a_source_is_stable_nested_and_keeps_every_class(tmp_path):
    # AffectNet keeps one folder per class: the first N ids would all be class 0, a hashed fraction is not.
    write_synthetic_datasets(tmp_path, train_per_class=40, test_per_class=1, datasets=["affectnet"])
    root = str(tmp_path / "AffectNet")

    def ids(fraction: float) -> list[str]:
        rows, errors = source_rows(CurateSource(dataset="affectnet", root=root, fraction=fraction))
        assert not errors
        return [r["id"] for r in rows]

    everything, half, fifth = ids(1.0), ids(0.5), ids(0.2)
    assert len(everything) == 8 * 40
    assert ids(0.5) == half, "the same ids on every run"
    assert set(fifth) < set(half) < set(everything)
    labels = {r["id"]: r["label"] for r in source_rows(CurateSource(dataset="affectnet", root=root))[0]}
    per_class = Counter(labels[i] for i in half)
    assert len(per_class) == 8 and all(10 <= n <= 30 for n in per_class.values()), per_class
    assert 0.4 < len(half) / len(everything) < 0.6 and 0.1 < len(fifth) / len(everything) < 0.3


def _oracle_config(sources: list[dict], out_dir: str, **overrides) -> CotSetConfig:
    data = {"sources": sources, "out_dir": out_dir, "k": 4, "m": 2, "rows_per_shard": 8, "load_batch_size": 8,
            "load_num_cpus": 1, "teacher": {"kind": "oracle", "wrong_rate": 0.2, "seed": 0, "batch_size": 8}}
    data.update(overrides)
    return parse_config(data, CotSetConfig)


def test_cot_oracle_keeps_only_verified_traces_and_resumes(ray_cluster, synthetic_root, tmp_path, capfd):
    # A private copy of RAF-DB with one unreadable train image: it must land in the errors table.
    rafdb = tmp_path / "data" / "RAF-DB"
    shutil.copytree(synthetic_root / "RAF-DB", rafdb)
    broken = "/RAF-DB/aligned/train_00005_aligned.jpg"
    (rafdb / "aligned" / "train_00005_aligned.jpg").write_bytes(b"not an image")
    sources = [{"dataset": "rafdb", "root": str(rafdb)}, {"dataset": "sfew", "root": str(synthetic_root / "SFEW-2.0")}]
    out = tmp_path / "cot"

    stats = curate_cot_set(_oracle_config(sources, str(out)))

    truth = _labels(synthetic_root, ("rafdb", "RAF-DB"), ("sfew", "SFEW-2.0"))
    assert stats["samples"] == len(truth) == 28 + 28
    assert stats["images_done"] == len(truth) - 1 and stats["images_failed"] == 1
    assert stats["generated"] == 4 * stats["images_done"]
    assert stats["accounted"] and stats["generated"] == stats["kept"] + sum(stats["rejected"].values())
    progress = [line for line in capfd.readouterr().err.split("\n") if line.startswith("curate cot: ")]
    assert progress and progress[-1].startswith("curate cot: 56/56 images (100%)")  # plain lines, as a log shows
    assert progress[-1].endswith(f"| kept {stats['kept']} rejected {stats['generated'] - stats['kept']} failed 1")
    # Wrong traces were made at about the configured rate, and the verification filter caught all of them.
    assert 0.1 < stats["rejected"]["wrong_answer"] / stats["generated"] < 0.3
    items = load_dataset("json", data_files=storage.list_files(out / "items", ".jsonl"), split="train").to_list()
    assert len(items) == stats["kept"] and len({i["id"] for i in items}) == len(items)
    for item in items:
        label, candidates = truth[item["image_path"]]
        assert parse_strict(item["response"], candidates) == label  # filter precision 100%
        assert item["teacher"] == "oracle" and item["question"].startswith("As an expert")
        assert ", ".join(candidates) in item["question"]
    per_image = Counter(item["image_path"] for item in items)
    assert max(per_image.values()) <= 2 and broken not in per_image
    errors = [json.loads(line) for line in (out / "errors.jsonl").read_text().splitlines()]
    assert [e["id"] for e in errors] == [f"rafdb:{broken}"] and errors[0]["reason"].startswith("image:")
    # The items read back through the reader the SFT stage uses, images resolved below the data root.
    rows = read_cot(str(out / "items"), image_root=str(tmp_path / "data")).take_all()
    assert len(rows) == len(items)
    assert all(Path(r["image_uri"]).is_file() for r in rows if r["dataset"] == "rafdb")

    # What an interruption leaves: some ledger shards never written, one cut off halfway. The rerun redoes
    # their images and retries the failed one, and nothing else.
    shards = storage.list_files(out / "ledger", ".parquet")
    assert len(shards) >= 3
    lost = shards[: len(shards) // 2] + [shards[-1]]
    lost_images = sum(pq.read_table(shard, columns=["error"])["error"].to_pylist().count("") for shard in lost)
    for shard in lost[:-1]:
        Path(shard).unlink()
    data = Path(shards[-1]).read_bytes()
    Path(shards[-1]).write_bytes(data[: len(data) // 2])

    again = curate_cot_set(_oracle_config(sources, str(out)))

    assert again["this_run"]["images"] == lost_images + 1
    errors_again = [json.loads(line) for line in (out / "errors.jsonl").read_text().splitlines()]
    assert [e["id"] for e in errors_again] == [f"rafdb:{broken}"]  # failed in both runs, listed once
    assert {k: again[k] for k in ("images_done", "images_failed", "generated", "kept", "rejected")} == {
        k: stats[k] for k in ("images_done", "images_failed", "generated", "kept", "rejected")}
    items_again = load_dataset("json", data_files=storage.list_files(out / "items", ".jsonl"), split="train").to_list()
    by_id = sorted(items, key=lambda item: item["id"])
    assert sorted(items_again, key=lambda item: item["id"]) == by_id  # the oracle is seeded: same traces, none twice


@pytest.mark.parametrize("engine", ["hf", pytest.param("vllm", marks=needs_vllm)])
def test_cot_with_the_tiny_engine_teacher_on_ray_data(ray_cluster, tiny_model_dir, synthetic_root, tmp_path, engine):
    config = parse_config({
        "sources": [{"dataset": "ferplus", "root": str(synthetic_root / "FERPlus"), "limit": 2}],
        "out_dir": str(tmp_path / "cot"), "k": 2, "m": 2, "hint": "label", "load_num_cpus": 1,
        "teacher": {"kind": "engine", "name": "tiny", "batch_size": 2, "image_size": 56,
                    "engine": {"engine": engine, "model": str(tiny_model_dir), "vllm_kwargs": VLLM_TEST_KWARGS},
                    "sampling": {"max_new_tokens": 12, "temperature": 1.0, "seed": 0}},
    }, CotSetConfig)

    stats = curate_cot_set(config)

    assert stats["images_done"] == 2 and stats["images_failed"] == 0
    assert stats["generated"] == 4 and stats["accounted"]
    ledger = read_ledger_rows(tmp_path / "cot")
    responses = [r for row in ledger for r in json.loads(row["responses"])]
    assert len(responses) == 4 and any(responses)  # real generations, whatever the filters made of them
    assert all(len(set(json.loads(row["responses"]))) == 2 for row in ledger)  # k samples, not k copies
    assert all(len(json.loads(row["verdicts"])) == 2 for row in ledger)
    assert all("correct answer" not in row["question"] for row in ledger)  # the hint reaches the teacher only


def read_ledger_rows(out: Path) -> list[dict]:
    return [row for shard in storage.list_files(out / "ledger", ".parquet") for row in pq.read_table(shard).to_pylist()]


def test_rlvr_excludes_planted_ferbench_images(ray_cluster, synthetic_root, tmp_path, capfd):
    data = synthetic_root
    # FERBench items of the test split, plus two train images planted under other names (same bytes).
    ferbench_root = tmp_path / "ferbench_images"
    fb_file = tmp_path / "rafdb_qa.json"
    convert_ferbench("rafdb", data / "RAF-DB", fb_file, split="test")
    items = json.loads(fb_file.read_text())
    for i, planted in enumerate(("train_00002_aligned.jpg", "train_00007_aligned.jpg")):
        target = ferbench_root / "planted" / f"copy_{i}.jpg"
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(data / "RAF-DB" / "aligned" / planted, target)
        items.append({**items[0], "image_path": f"/planted/copy_{i}.jpg"})
    shutil.copytree(data / "RAF-DB", ferbench_root / "RAF-DB")
    fb_file.write_text(json.dumps(items))
    config = parse_config({
        "sources": [{"dataset": "rafdb", "root": str(data / "RAF-DB")}], "out_dir": str(tmp_path / "rlvr"),
        "format": "parquet", "balance": True, "ferbench_files": [str(fb_file)],
        "ferbench_image_root": str(ferbench_root), "rows_per_shard": 8, "hash_batch_size": 8, "load_num_cpus": 1,
    }, RlvrSetConfig)

    stats = curate_rlvr_set(config)

    assert stats["ferbench"]["images"] == len(items) and stats["ferbench"]["unhashable"] == 0
    assert stats["excluded_ferbench"] == 2 and stats["images_done"] == 28
    assert stats["items"] == 4 * 26 and stats["by_task"] == {t: 26 for t in ("binary", "mc", "mc_shuffled", "unified")}
    progress = [line for line in capfd.readouterr().err.split("\n") if line.startswith("curate rlvr: ")]
    assert progress and progress[-1].startswith("curate rlvr: 28/28 images (100%)")
    assert progress[-1].endswith("| items 104 excluded_ferbench 2 failed 0")
    rows = load_dataset("parquet", data_files=storage.list_files(tmp_path / "rlvr" / "items", ".parquet"),
                        split="train").to_list()
    paths = {r["image_path"] for r in rows}
    assert len(rows) == stats["items"] and len(paths) == 26
    assert not paths & {"/RAF-DB/aligned/train_00002_aligned.jpg", "/RAF-DB/aligned/train_00007_aligned.jpg"}
    truth = _labels(data, ("rafdb", "RAF-DB"))
    for row in rows:
        if row["task"] in ("mc", "mc_shuffled"):
            assert row["solution"] == f"<answer>{truth[row['image_path']][0]}</answer>"
    read = read_rlvr(str(tmp_path / "rlvr" / "items"), image_root=str(data)).take_all()
    assert len(read) == len(rows) and all(Path(r["image_uri"]).is_file() for r in read)


def _rlvr_on_s3(config: RlvrSetConfig, image_root: str) -> tuple[dict, list[dict]]:
    """Curate to S3 and read the items back: the stats and the rows read."""
    stats = curate_rlvr_set(config)
    return stats, read_rlvr(storage.join(config.out_dir, "items"), image_root=image_root).take_all()


def test_rlvr_round_trip_through_s3(s3_server, ray_cluster, synthetic_root, tmp_path):
    out = f"{s3_server}/curate-{tmp_path.name}/rlvr"
    config = parse_config({"sources": [{"dataset": "sfew", "root": str(synthetic_root / "SFEW-2.0"), "limit": 10}],
                           "out_dir": out, "tasks": ["mc", "binary"], "load_num_cpus": 1}, RlvrSetConfig)
    # The session's Ray workers were started with the S3 server's variables (conftest), as a job's runtime env would.
    stats, rows = _rlvr_on_s3(config, str(synthetic_root))

    assert stats["images_done"] == 10 and stats["items"] == 20
    assert json.loads(storage.read_text(storage.join(out, "stats.json"))) == stats
    assert storage.read_text(storage.join(out, "errors.jsonl")) == ""
    assert len(rows) == 20 and all(r["source"].startswith("s3://") for r in rows)
    assert all(Path(r["image_uri"]).is_file() for r in rows)
    assert len(done_ids(storage.join(out, "ledger"))) == 10  # what a rerun would skip, read back from S3
