"""The converter reproduces the four reference FERBench files (11,072 items) from datasets in their own layouts.

Each dataset tree is built from the reference items themselves (empty image files: nothing is decoded), plus
train-split rows and rows the dataset drops, which must not reach the output.
"""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest

from unifer_ray.data.convert import convert_ferbench
from unifer_ray.labels import AFFECTNET, RAFDB, dataset_spec

REFERENCE_DIR = Path("/work/shared/ferbench")
AFFECTNET_HEADER = [
    "subDirectory_filePath", "face_x", "face_y", "face_width", "face_height", "facial_landmarks",
    "expression", "valence", "arousal",
]


def touch(path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"")


def below(image_path: str, prefix: str) -> str:
    assert image_path.startswith(prefix), image_path
    return image_path[len(prefix):]


def build_rafdb(root: Path, items: list[dict]) -> int:
    lines = []
    for item in items:
        name = below(item["image_path"], "/RAF-DB/aligned/")  # test_0001_aligned.jpg
        touch(root / "aligned" / name)
        lines.append(f"{name.replace('_aligned.jpg', '.jpg')} {RAFDB.labels.index(item['true_label']) + 1}")
    for i in range(1, 4):  # train rows: another split
        touch(root / "aligned" / f"train_{i:05d}_aligned.jpg")
        lines.insert(i * 100, f"train_{i:05d}.jpg {i}")
    (root / "EmoLabel").mkdir()
    (root / "EmoLabel" / "list_patition_label.txt").write_text("\n".join(lines) + "\n")
    return 0  # RAF-DB drops nothing


def build_ferplus(root: Path, items: list[dict]) -> int:
    for item in items:
        touch(root / below(item["image_path"], "/FERPlus/"))  # test/<label>/fer%07d.png
    touch(root / "train" / "happy" / "fer0000007.png")
    touch(root / "valid" / "sad" / "fer0028700.png")
    return 0


def build_affectnet(root: Path, items: list[dict]) -> int:
    def row(sub_path: str, code: int) -> list:
        return [sub_path, 10, 12, 200, 200, "1.5;2.5;3.5", code, 0.1, -0.2]

    validation = [row(below(i["image_path"], "/AffectNet/Manually_Annotated/validation/"),
                      AFFECTNET.labels.index(i["true_label"])) for i in items]
    dropped = [row(f"7/dropped_{code}.jpg", code) for code in (8, 9, 10)]  # none, uncertain, non-face
    for sub_path, *_ in validation + dropped:
        touch(root / "Manually_Annotated" / "validation" / sub_path)
    training = [row("3/train_a.jpg", 1), row("3/train_b.jpg", 6)]
    for sub_path, *_ in training:
        touch(root / "Manually_Annotated" / "training" / sub_path)
    for name, rows in (("validation.csv", validation[:2000] + dropped + validation[2000:]), ("training.csv", training)):
        with open(root / name, "w", newline="") as f:
            writer = csv.writer(f)
            writer.writerow(AFFECTNET_HEADER)
            writer.writerows(rows)
    return len(dropped)


def build_sfew(root: Path, items: list[dict]) -> int:
    for item in items:
        touch(root / below(item["image_path"], "/SFEW-2.0/"))  # Val/Val_Aligned_Faces/<Label>/*.png
    touch(root / "Train" / "Train_Aligned_Faces" / "Happy" / "train_face.png")
    return 0


BUILDERS = {"rafdb": build_rafdb, "ferplus": build_ferplus, "affectnet": build_affectnet, "sfew": build_sfew}


@pytest.mark.parametrize("dataset", sorted(BUILDERS))
def test_convert_reproduces_reference_file(dataset, tmp_path):
    spec = dataset_spec(dataset)
    reference_text = (REFERENCE_DIR / spec.ferbench_file).read_text()
    reference = json.loads(reference_text)
    root = tmp_path / "data" / spec.name
    root.mkdir(parents=True)
    n_dropped = BUILDERS[dataset](root, reference)

    out = tmp_path / "out" / spec.ferbench_file
    report = convert_ferbench(dataset, root, out)

    assert report["samples"] == len(reference)
    assert (report["errors"], report["dropped"]) == (0, n_dropped)
    assert Path(report["errors_path"]).read_text() == ""  # written empty: no stale file from an earlier run
    # Same items, same formatting: the written file is the reference file with its items sorted by image_path.
    expected = sorted(reference, key=lambda item: item["image_path"])
    assert out.read_text() == json.dumps(expected, indent=2)
    if n_dropped:  # AffectNet only
        dropped = [json.loads(line) for line in Path(report["dropped_path"]).read_text().splitlines()]
        assert [d["row"] for d in dropped] == [2002, 2003, 2004]  # header is line 1
        assert all(d["source"] == str(root / "validation.csv") for d in dropped)


def test_reference_files_hold_11072_items():
    total = sum(len(json.loads((REFERENCE_DIR / dataset_spec(d).ferbench_file).read_text())) for d in BUILDERS)
    assert total == 11072
