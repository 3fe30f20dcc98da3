"""Hugging Face datasets and models, offline: datasets built here (save_to_disk, a parquet folder, an imagefolder
tree) from the synthetic faces, with an `Image` feature and a `ClassLabel`; models through a hub-layout cache made
from the tiny model with HF_HUB_OFFLINE=1; curated sets written as datasets and read back into the SFT loader."""

from __future__ import annotations

import hashlib
import io
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import datasets
import pytest
import yaml
from PIL import Image

from unifer_ray.bench.items import read_items
from unifer_ray.config import parse_config
from unifer_ray.curate.config import CotSetConfig, CurateSource, RlvrSetConfig
from unifer_ray.curate.cot import curate_cot_set
from unifer_ray.curate.rlvr import curate_rlvr_set
from unifer_ray.data.convert import convert_hf_ferbench
from unifer_ray.data.hf_export import export_results, export_training_set
from unifer_ray.data.hf_source import HFSource, read_hf_samples
from unifer_ray.data.images import load_image
from unifer_ray.data.sources import read_samples
from unifer_ray.data.training_sets import read_rlvr
from unifer_ray.labels import RAFDB

# The dataset's own names: other cases and FERBench's synonyms of RAF-DB's labels, and one label RAF-DB lacks.
NAMES = ["Surprise", "Fear", "Disgust", "Happy", "Sad", "Angry", "Neutral", "Contempt"]
OURS = dict(zip(NAMES, [*RAFDB.labels, None]))
FEATURES = datasets.Features({"image": datasets.Image(), "label": datasets.ClassLabel(names=NAMES)})
NOT_AN_IMAGE = b"not an image"


def _png() -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (32, 32), (200, 120, 90)).save(buf, format="PNG")
    return buf.getvalue()


def _digest(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()[:20]


def _split_rows(synthetic_root: Path, split: str) -> tuple[dict, dict[str, str]]:
    """The split's faces as columns (plus an undecodable image and a Contempt face), and digest -> our label."""
    samples = read_samples("rafdb", synthetic_root / "RAF-DB", split).samples
    images = [Path(s.image).read_bytes() for s in samples]
    labels = [NAMES[RAFDB.labels.index(s.label)] for s in samples]
    expected = {_digest(data): s.label for data, s in zip(images, samples)}
    images += [NOT_AN_IMAGE, _png()]  # the second: a valid image, labelled with what RAF-DB lacks
    labels += ["Happy", "Contempt"]
    return {"image": [{"bytes": b, "path": None} for b in images], "label": labels}, expected


@pytest.fixture(scope="module")
def hf_datasets(synthetic_root, tmp_path_factory):
    """{kind: path} of the same faces as three local Hugging Face datasets, and digest -> label per split."""
    root = tmp_path_factory.mktemp("hf_datasets")
    columns, expected = {}, {}
    for split in ("train", "test"):
        columns[split], expected[split] = _split_rows(synthetic_root, split)
    splits = datasets.DatasetDict({s: datasets.Dataset.from_dict(c, features=FEATURES) for s, c in columns.items()})
    splits.save_to_disk(str(root / "saved"))
    for split, ds in splits.items():
        ds.to_parquet(str(root / "parquet" / f"{split}-00000-of-00001.parquet"))
    for split, cols in columns.items():  # imagefolder: <split>/<label>/<file>, the folder names are the labels
        for i, (image, label) in enumerate(zip(cols["image"], cols["label"])):
            folder = root / "imagefolder" / split / label
            folder.mkdir(parents=True, exist_ok=True)
            (folder / f"{i:03d}.png").write_bytes(image["bytes"])
    return {"saved": root / "saved", "parquet": root / "parquet", "imagefolder": root / "imagefolder"}, expected


@pytest.mark.parametrize("kind", ["saved", "parquet", "imagefolder"])
def test_convert_ferbench_from_each_kind_maps_labels_and_records_bad_rows(kind, hf_datasets, synthetic_root,
                                                                          tmp_path):
    paths, expected = hf_datasets
    out = tmp_path / "ferbench" / "rafdb_qa.json"

    report = convert_hf_ferbench(HFSource(path=str(paths[kind]), split="test", dataset="rafdb"), out)

    items = json.loads(out.read_text())
    assert report["samples"] == len(items) == len(expected["test"]) == 21
    for item in items:
        digest = Path(item["image_path"]).stem
        assert item["image_path"].startswith("/RAF-DB/test/")
        assert item["true_label"] == expected["test"][digest], "Happy -> happiness, Angry -> anger, any case"
        assert item["candidate_labels"] == list(RAFDB.labels)
    # The items read below the directory holding out, as FERBench files are; their images decode.
    rows = read_items(str(out), image_root=str(out.parent)).rows
    assert len(rows) == 21 and all(load_image(r["image_uri"]).size for r in rows)
    errors = [json.loads(line) for line in Path(report["errors_path"]).read_text().splitlines()]
    reasons = sorted(e["reason"] for e in errors)
    assert len(errors) == 2 and "not a decodable image" in reasons[1] and "'Contempt'" in reasons[0]
    assert all(e["source"] and e["row"] is not None for e in errors)
    if kind == "imagefolder":  # a bad image file is named as folder sources name it: folder and file name
        assert {e["source"] for e in errors} == {str(paths[kind] / "test" / "Happy"),
                                                 str(paths[kind] / "test" / "Contempt")}
    else:
        assert {e["row"] for e in errors} == {21, 22}


def test_a_missing_split_or_column_names_what_exists(hf_datasets, tmp_path):
    paths, _ = hf_datasets
    for kind in ("saved", "parquet", "imagefolder"):
        with pytest.raises(ValueError, match=r"no split 'valid'; it has \['(train|test)', '(train|test)'\]"):
            read_hf_samples(HFSource(path=str(paths[kind]), split="valid", dataset="rafdb"), tmp_path)
    with pytest.raises(ValueError, match=r"no column 'emotion'; its columns are \['image', 'label'\]"):
        read_hf_samples(HFSource(path=str(paths["parquet"]), split="test", dataset="rafdb", label_column="emotion"),
                        tmp_path)
    with pytest.raises(FileNotFoundError, match="nowhere"):
        read_hf_samples(HFSource(path=str(tmp_path / "nowhere"), split="test", dataset="rafdb"), tmp_path)
    with pytest.raises(ValueError, match="outside the candidate labels"):
        read_hf_samples(HFSource(path=str(paths["saved"]), split="test", dataset="rafdb",
                                 label_map={"Contempt": "contempt"}), tmp_path)


def test_plain_ids_string_labels_and_a_label_map(synthetic_root, tmp_path):
    samples = read_samples("rafdb", synthetic_root / "RAF-DB", "test").samples[:4]
    images = [{"bytes": Path(s.image).read_bytes(), "path": None} for s in samples]
    features = datasets.Features({"img": datasets.Image(), "emotion": datasets.Value("int64")})
    datasets.Dataset.from_dict({"img": images, "emotion": [0, 3, 6, 7]}, features=features).save_to_disk(
        str(tmp_path / "ids"))
    strings = datasets.Features({"img": datasets.Image(), "emotion": datasets.Value("string")})
    datasets.DatasetDict({"test": datasets.Dataset.from_dict(
        {"img": images, "emotion": ["JOY", "fear", "Neutral", "grumpy"]}, features=strings)}).save_to_disk(
        str(tmp_path / "strings"))

    by_order = read_hf_samples(HFSource(path=str(tmp_path / "ids"), split="test", dataset="rafdb",
                                        image_column="img", label_column="emotion"), tmp_path / "images")
    mapped = read_hf_samples(HFSource(path=str(tmp_path / "strings"), split="test", dataset="mine",
                                      image_column="img", label_column="emotion", labels=("joy", "fear", "calm"),
                                      label_map={"Neutral": "calm"}), tmp_path / "images")

    # Ids without names follow the label set's order; 7 is outside RAF-DB's seven labels.
    assert sorted(s.label for s in by_order.samples) == sorted(["surprise", "happiness", "neutral"])
    assert [e["row"] for e in by_order.errors] == [3] and "index" in by_order.errors[0]["reason"]
    assert sorted(s.label for s in mapped.samples) == ["calm", "fear", "joy"]
    assert all(s.dataset == "mine" and s.candidate_labels == ["joy", "fear", "calm"] for s in mapped.samples)
    assert "'grumpy'" in mapped.errors[0]["reason"]


def test_cli_converts_a_hf_dataset_with_its_own_columns(hf_datasets, tmp_path):
    paths, expected = hf_datasets
    renamed = tmp_path / "renamed"
    ds = datasets.load_from_disk(str(paths["saved"]))["test"].rename_columns({"image": "face", "label": "emotion"})
    ds.to_parquet(str(renamed / "test-00000-of-00001.parquet"))
    out = tmp_path / "ferbench" / "rafdb_qa.json"

    proc = subprocess.run([sys.executable, "-m", "unifer_ray.cli", "convert", "ferbench", "--dataset", "rafdb",
                           "--hf", str(renamed), "--split", "test", "--image-column", "face",
                           "--label-column", "emotion", "--out", str(out)],
                          capture_output=True, text=True, timeout=120)
    missing = subprocess.run([sys.executable, "-m", "unifer_ray.cli", "convert", "ferbench", "--dataset", "rafdb",
                              "--hf", str(renamed), "--split", "train", "--out", str(tmp_path / "x.json")],
                             capture_output=True, text=True, timeout=120)

    assert proc.returncode == 0, proc.stderr
    report = json.loads(proc.stdout)
    assert report["samples"] == 21 and report["errors"] == 2 and report["image_dir"] == str(out.parent / "RAF-DB")
    assert {i["true_label"] for i in json.loads(out.read_text())} == set(expected["test"].values())
    assert missing.returncode == 2 and "no split 'train'; it has ['test']" in missing.stderr


def _rlvr_config(sources: list[dict], out_dir: str, **extra) -> RlvrSetConfig:
    return parse_config({"sources": sources, "out_dir": out_dir, "tasks": ["mc", "binary"], "rows_per_shard": 16,
                         "load_batch_size": 16, "hash_batch_size": 16, "load_num_cpus": 1, **extra}, RlvrSetConfig)


def test_curate_rlvr_from_a_hf_source_on_ray_then_export_and_read_back(ray_cluster, hf_datasets, synthetic_root,
                                                                       tmp_path):
    paths, expected = hf_datasets
    out = tmp_path / "rlvr"
    config = _rlvr_config([{"dataset": "rafdb", "hf": str(paths["parquet"])}], str(out))

    stats = curate_rlvr_set(config)

    train = expected["train"]
    assert stats["samples"] == len(train) == 28 and stats["images_done"] == 28 and stats["items"] == 2 * 28
    assert stats["source_errors"] == 2
    errors = [json.loads(line) for line in (out / "errors.jsonl").read_text().splitlines()]
    assert sorted(e["row"] for e in errors) == [28, 29]
    images = out / "images" / "RAF-DB" / "train"
    assert sorted(p.stem for p in images.iterdir()) == sorted(train), "the images of the good rows, once each"

    report = export_training_set("rlvr", str(out / "items"), str(tmp_path / "hf_rlvr"))

    back = read_rlvr(str(tmp_path / "hf_rlvr"), image_root=str(out / "images")).take_all()
    direct = read_rlvr(str(out / "items"), image_root=str(out / "images")).take_all()
    assert report["rows"] == len(back) == len(direct) == 56
    key = ("id", "dataset", "task", "image_path", "image_uri", "problem", "solution", "answer")
    assert sorted(tuple(r[k] for k in key) for r in back) == sorted(tuple(r[k] for k in key) for r in direct)
    assert all(Path(r["image_uri"]).is_file() for r in back)
    mc = {Path(r["image_path"]).stem: r["answer"] for r in back if r["task"] == "mc"}
    assert mc == train, "every image's mc answer is its label"
    card = (tmp_path / "hf_rlvr" / "README.md").read_text()
    meta = yaml.safe_load(card.split("---")[1])
    assert meta["dataset_info"]["splits"] == [{"name": "train", "num_bytes": 0, "num_examples": 56}]
    assert meta["configs"][0]["data_files"] == [{"split": "train", "path": "data/train-*.parquet"}]
    assert "| binary | 28 |" in card and '"pipeline": "rlvr"' in card
    # The hub's own loader reads what would be pushed.
    assert datasets.load_dataset(str(tmp_path / "hf_rlvr"), split="train").num_rows == 56


def test_a_hf_source_is_refused_where_it_cannot_work():
    with pytest.raises(ValueError, match="either root"):
        CurateSource(dataset="rafdb")
    with pytest.raises(ValueError, match="either root"):
        CurateSource(dataset="rafdb", root="/data/RAF-DB", hf="org/rafdb")
    with pytest.raises(ValueError, match="label_map: for hf sources only"):
        CurateSource(dataset="rafdb", root="/data/RAF-DB", label_map={"Happy": "happiness"})
    assert CurateSource(dataset="my-fer", hf="org/my-fer").hf_source().dataset == "my-fer"


def test_cot_round_trip_curate_export_read_back_sft_loader(ray_cluster, synthetic_root, tiny_model_dir, tmp_path):
    from transformers import AutoProcessor

    from unifer_ray.train.collate import SFTCollator
    from unifer_ray.train.config import SFTConfig
    from unifer_ray.train.sft import training_rows

    out = tmp_path / "cot"
    config = parse_config({"sources": [{"dataset": "sfew", "root": str(synthetic_root / "SFEW-2.0")}],
                           "out_dir": str(out), "k": 2, "m": 1, "rows_per_shard": 16, "load_batch_size": 16,
                           "load_num_cpus": 1, "teacher": {"kind": "oracle", "seed": 0, "batch_size": 16}},
                          CotSetConfig)
    stats = curate_cot_set(config)
    report = export_training_set("cot", str(out / "items"), str(tmp_path / "hf_cot"))
    sft = SFTConfig(model=str(tiny_model_dir), data=[str(tmp_path / "hf_cot")], image_root=str(synthetic_root),
                    output_dir=str(tmp_path / "sft"), checkpoint_dir=str(tmp_path / "ckpt"))

    rows = training_rows(sft).take_all()
    batch = SFTCollator(AutoProcessor.from_pretrained(tiny_model_dir), image_size=56, max_seq_len=2048)(rows[:4])

    assert report["rows"] == stats["kept"] == len(rows) > 0
    assert all(r["image_uri"].startswith(f"{synthetic_root}/SFEW-2.0/") for r in rows)
    assert not batch.errors and len(batch.ids) == 4 and (batch.inputs["labels"] != -100).any()
    assert '"teacher": "oracle"' in (tmp_path / "hf_cot" / "README.md").read_text()


def test_export_results_of_a_benchmark_run(tmp_path):
    rows = [{"id": f"rafdb:/RAF-DB/{i}.jpg", "model": model, "dataset": "rafdb", "image_path": f"/RAF-DB/{i}.jpg",
             "true_label": "fear", "candidate_labels": list(RAFDB.labels), "response": "<answer>fear</answer>",
             "parsed_strict": None if model == "b" else "fear", "parsed_paper": "fear", "correct_strict": model == "a",
             "correct_paper": True, "format_ok": False, "latency_s": 0.5, "num_tokens": 4, "engine": "hf",
             "status": "scored", "error": ""} for model in ("a", "b") for i in range(3)]
    for model in ("a", "b"):
        path = tmp_path / "bench" / "results" / model / "results.jsonl"
        path.parent.mkdir(parents=True)
        path.write_text("".join(json.dumps(r) + "\n" for r in rows if r["model"] == model))
    (tmp_path / "bench" / "summary.json").write_text(json.dumps({"models": ["a", "b"]}))

    report = export_results(str(tmp_path / "bench"), str(tmp_path / "hf_results"))

    back = datasets.load_dataset(str(tmp_path / "hf_results"), split="test")
    assert report["rows"] == back.num_rows == 6
    # Model b's parsed_strict is null in every row: its column type is promoted to the other model's.
    assert dict(zip(back["model"], back["parsed_strict"])) == {"a": "fear", "b": None}
    assert "| a | 3 |" in (tmp_path / "hf_results" / "README.md").read_text()
    with pytest.raises(FileNotFoundError, match="not a benchmark's out_dir"):
        export_results(str(tmp_path), str(tmp_path / "x"))


# Models by hub id: a hub-layout cache of the tiny model, read with HF_HUB_OFFLINE=1.
REPO = "unifer-test/tiny-qwen2.5-vl"
MAIN, TAGGED = "a" * 40, "b" * 40


@pytest.fixture(scope="module")
def hub_home(tiny_model_dir, tmp_path_factory):
    """HF_HOME holding hub/models--unifer-test--tiny-qwen2.5-vl: refs main and v1, one snapshot each."""
    home = tmp_path_factory.mktemp("hf_home")
    repo = home / "hub" / ("models--" + REPO.replace("/", "--"))
    for ref, commit in (("main", MAIN), ("v1", TAGGED)):
        shutil.copytree(tiny_model_dir, repo / "snapshots" / commit)
        (repo / "refs").mkdir(parents=True, exist_ok=True)
        (repo / "refs" / ref).write_text(commit)
    return home


@pytest.fixture
def offline_hub(hub_home, monkeypatch):
    """This process and the processes it starts see `hub_home` as their cache, offline."""
    from huggingface_hub import constants

    monkeypatch.setenv("HF_HOME", str(hub_home))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(hub_home / "hub"))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    return hub_home


def test_hub_ids_resolve_from_the_offline_cache(offline_hub, tiny_model_dir):
    from unifer_ray.engines import ChatRequest, EngineSpec, SamplingParams, create_engine
    from unifer_ray.models.model_dir import local_model_dir

    snapshots = offline_hub / "hub" / ("models--" + REPO.replace("/", "--")) / "snapshots"
    assert local_model_dir(REPO) == str(snapshots / MAIN)
    assert local_model_dir(REPO, revision="v1") == str(snapshots / TAGGED)
    assert local_model_dir(str(tiny_model_dir)) == str(tiny_model_dir), "a local directory stays itself"
    with pytest.raises(FileNotFoundError, match=r"unifer-test/absent.*HF_HUB_OFFLINE=1"):
        local_model_dir("unifer-test/absent")
    with pytest.raises(FileNotFoundError, match="revision 'v2'"):
        local_model_dir(REPO, revision="v2")

    engine = create_engine(EngineSpec(engine="hf", model=REPO, revision="v1", dtype="float32"))
    request = ChatRequest([{"role": "user", "content": [{"type": "text", "text": "Which emotion?"}]}])
    [completions] = engine.generate([request], SamplingParams(max_new_tokens=4, temperature=0.0))
    assert completions[0].token_ids and len(completions[0].token_ids) <= 4


def test_bench_run_on_a_hf_dataset_with_a_hub_id_model(ray_cluster, offline_hub, hf_datasets, tmp_path):
    """What a user runs: convert a Hugging Face dataset, then benchmark a hub-id model on it, offline. The command
    joins the running cluster, whose workers were started without HF_HOME and HF_HUB_OFFLINE: the driver's reach
    them through its runtime env."""
    paths, _ = hf_datasets
    items = tmp_path / "ferbench" / "rafdb_qa.json"
    cli = [sys.executable, "-m", "unifer_ray.cli"]
    env = os.environ | {"RAY_ADDRESS": ray_cluster.get_runtime_context().gcs_address}
    convert = subprocess.run([*cli, "convert", "ferbench", "--dataset", "rafdb", "--hf", str(paths["saved"]),
                              "--split", "test", "--out", str(items)], capture_output=True, text=True, timeout=120)
    assert convert.returncode == 0, convert.stderr
    config = tmp_path / "bench.yaml"
    config.write_text(yaml.safe_dump({
        "files": [{"path": str(items), "image_root": str(items.parent), "limit": 4}],
        "models": [{"name": "tiny-hub", "engine": {"engine": "hf", "model": REPO, "dtype": "float32"},
                    "sampling": {"max_new_tokens": 8}, "image_size": 56, "batch_size": 4, "num_cpus": 1}],
        "out_dir": str(tmp_path / "bench"),
    }))

    bench = subprocess.run([*cli, "bench", "run", "--config", str(config)], capture_output=True, text=True,
                           timeout=300, env=env)

    assert bench.returncode == 0, bench.stderr[-3000:]
    results = [json.loads(line) for line in (tmp_path / "bench" / "results" / "tiny-hub" / "results.jsonl")
               .read_text().splitlines()]
    assert len(results) == 4 and all(r["status"] == "scored" and r["engine"] == "hf" for r in results)
