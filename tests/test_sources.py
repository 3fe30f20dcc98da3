"""Dataset adapters: good rows come out, bad rows become error records naming file, row and reason, and
every row of a split is counted once (samples + errors + dropped)."""

from __future__ import annotations

import csv
import io
import json
from pathlib import Path

import pytest
from PIL import Image

from unifer_ray.data.convert import convert_ferbench, to_ferbench_items
from unifer_ray.data.sources import read_samples
from unifer_ray.labels import AFFECTNET, FERPLUS, RAFDB, SFEW
from unifer_ray.prompts import ferbench_prompt


def touch(path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"\x89PNG placeholder")
    return path


def counted(result) -> int:
    return len(result.samples) + len(result.errors) + len(result.dropped)


def by_row(records: list[dict]) -> dict:
    return {r["row"]: r for r in records}


# ---------------------------------------------------------------- RAF-DB

def make_rafdb(root: Path) -> Path:
    for name in ("test_0001", "test_0002", "test_0005", "train_00001", "train_00002"):
        touch(root / "aligned" / f"{name}_aligned.jpg")
    label_file = root / "EmoLabel" / "list_patition_label.txt"
    label_file.parent.mkdir(parents=True)
    label_file.write_text(
        "test_0001.jpg 5\n"  # 1: sadness
        "test_0002.jpg 7\n"  # 2: neutral
        "test_0003.jpg 1\n"  # 3: no such image
        "test_0005.jpg 8\n"  # 4: code out of range
        "test_0005.jpg x\n"  # 5: code not a number
        "\n"  # 6: blank lines are not rows
        "test_0001.jpg 5 extra\n"  # 7: malformed
        "photo.jpg 3\n"  # 8: no split prefix
        "train_00001.jpg 4\n"  # 9
        "train_00002.jpg 6\n"  # 10
    )
    return label_file


def test_rafdb_good_rows_and_error_records(tmp_path):
    label_file = make_rafdb(tmp_path)
    result = read_samples("rafdb", tmp_path, "test")

    assert [(s.id, s.label, s.split) for s in result.samples] == [
        ("aligned/test_0001_aligned.jpg", "sadness", "test"),
        ("aligned/test_0002_aligned.jpg", "neutral", "test"),
    ]
    first = result.samples[0]
    assert first.image == str(tmp_path / "aligned" / "test_0001_aligned.jpg")
    assert first.rel_path == "aligned/test_0001_aligned.jpg"
    assert first.dataset == "rafdb" and first.candidate_labels == list(RAFDB.labels)

    errors = by_row(result.errors)
    assert sorted(errors) == [3, 4, 5, 7, 8]
    assert all(e["source"] == str(label_file) for e in result.errors)
    assert "test_0003_aligned.jpg not found" in errors[3]["reason"]
    assert "'8' is not one of 1-7" in errors[4]["reason"]
    assert "'x'" in errors[5]["reason"]
    assert "malformed line" in errors[7]["reason"] and "malformed line" in errors[8]["reason"]
    assert result.dropped == []
    # Six test lines plus one line of no split; train lines are not read for split "test".
    assert counted(result) == 7

    train = read_samples("rafdb", tmp_path, "train")
    assert [(s.label, s.split) for s in train.samples] == [("happiness", "train"), ("anger", "train")]
    assert counted(read_samples("rafdb", tmp_path)) == 9  # every non-blank line


def test_rafdb_original_image_folder(tmp_path):
    touch(tmp_path / "Image" / "aligned" / "test_0001_aligned.jpg")
    (tmp_path / "EmoLabel").mkdir()
    (tmp_path / "EmoLabel" / "list_patition_label.txt").write_text("test_0001.jpg 3\n")
    (sample,) = read_samples("rafdb", tmp_path).samples
    assert (sample.rel_path, sample.label) == ("Image/aligned/test_0001_aligned.jpg", "disgust")


def test_missing_root_label_file_and_bad_arguments_are_clear(tmp_path):
    with pytest.raises(FileNotFoundError, match="nowhere.*EmoLabel/list_patition_label.txt"):
        read_samples("rafdb", tmp_path / "nowhere")
    (tmp_path / "aligned").mkdir()
    with pytest.raises(FileNotFoundError, match="list_patition_label.txt not found"):
        read_samples("rafdb", tmp_path)
    with pytest.raises(FileNotFoundError, match="has no test split.*validation.csv"):
        read_samples("affectnet", tmp_path, "test")
    with pytest.raises(FileNotFoundError, match="Val_Aligned_Faces"):
        read_samples("sfew", tmp_path)
    with pytest.raises(ValueError, match="no split 'valid'"):
        read_samples("sfew", tmp_path, "valid")
    with pytest.raises(ValueError, match="unknown dataset layout 'fer'"):
        read_samples("fer", tmp_path)
    with pytest.raises(ValueError, match="labels= applies to the 'folder' layout only"):
        read_samples("rafdb", tmp_path, labels=["a"])


# ---------------------------------------------------------------- folder trees: FERPlus, SFEW, generic

def test_ferplus_tree_folder_outside_label_set(tmp_path):
    touch(tmp_path / "test" / "angry" / "fer0032225.png")
    touch(tmp_path / "test" / "happy" / "fer0032226.png")
    touch(tmp_path / "test" / "happy" / "notes.txt")  # not an image: not a row
    touch(tmp_path / "test" / "happyy" / "fer0032227.png")
    touch(tmp_path / "test" / "happyy" / "fer0032228.png")
    touch(tmp_path / "valid" / "sad" / "fer0028700.png")

    result = read_samples("ferplus", tmp_path, "test")
    assert [(s.id, s.label) for s in result.samples] == [
        ("test/angry/fer0032225.png", "angry"), ("test/happy/fer0032226.png", "happy"),
    ]
    assert result.samples[0].candidate_labels == list(FERPLUS.labels)
    assert [(e["source"], e["row"]) for e in result.errors] == [
        (str(tmp_path / "test" / "happyy"), "fer0032227.png"),
        (str(tmp_path / "test" / "happyy"), "fer0032228.png"),
    ]
    assert "folder 'happyy' is not a label" in result.errors[0]["reason"]
    assert counted(result) == 4
    assert [s.split for s in read_samples("ferplus", tmp_path).samples] == ["test", "test", "valid"]


def test_sfew_capitalised_folders_and_splits(tmp_path):
    touch(tmp_path / "Val" / "Val_Aligned_Faces" / "Angry" / "a.png")
    touch(tmp_path / "Val" / "Val_Aligned_Faces" / "Surprise" / "b.png")
    touch(tmp_path / "Train" / "Train_Aligned_Faces" / "Happy" / "c.png")
    touch(tmp_path / "Train" / "Train_Aligned_Faces" / "Contempt" / "d.png")
    result = read_samples("sfew", tmp_path)
    assert [(s.rel_path, s.label, s.split) for s in result.samples] == [
        ("Train/Train_Aligned_Faces/Happy/c.png", "happy", "train"),
        ("Val/Val_Aligned_Faces/Angry/a.png", "angry", "test"),
        ("Val/Val_Aligned_Faces/Surprise/b.png", "surprise", "test"),
    ]
    assert result.samples[0].candidate_labels == list(SFEW.labels)
    assert [e["row"] for e in result.errors] == ["d.png"]


def test_generic_folder_with_and_without_label_list(tmp_path):
    root = tmp_path / "my_faces"
    touch(root / "joy" / "1.jpg")
    touch(root / "joy" / "2.JPEG")
    touch(root / "calm" / "3.webp")
    touch(root / "other" / "4.bmp")

    given = read_samples("folder", root, labels=["joy", "calm"])
    assert [(s.id, s.label, s.split, s.dataset) for s in given.samples] == [
        ("calm/3.webp", "calm", "test", "my_faces"),
        ("joy/1.jpg", "joy", "test", "my_faces"),
        ("joy/2.JPEG", "joy", "test", "my_faces"),
    ]
    assert given.samples[0].candidate_labels == ["joy", "calm"]
    assert [(e["source"], e["row"]) for e in given.errors] == [(str(root / "other"), "4.bmp")]

    inferred = read_samples("folder", root, "train")
    assert inferred.errors == []
    assert {s.label for s in inferred.samples} == {"calm", "joy", "other"}
    assert inferred.samples[0].candidate_labels == ["calm", "joy", "other"]
    assert {s.split for s in inferred.samples} == {"train"}

    out = tmp_path / "faces.json"
    report = convert_ferbench("folder", root, out, path_prefix="s3://bucket/my_faces/")
    items = json.loads(out.read_text())
    assert report["samples"] == 4 and items[0]["image_path"] == "s3://bucket/my_faces/calm/3.webp"
    assert items[0]["prompt"] == ferbench_prompt(["calm", "joy", "other"])


# ---------------------------------------------------------------- AffectNet

AFFECTNET_HEADER = (
    "subDirectory_filePath,face_x,face_y,face_width,face_height,facial_landmarks,expression,valence,arousal"
)


def affectnet_line(sub_path: str, code: str) -> str:
    return f'{sub_path},1,2,100,100,"1.0;2.0;3.0",{code},0.5,-0.5'


def test_affectnet_codes_drops_and_bad_rows(tmp_path):
    for name in ("a.jpg", "b.jpg", "c.jpg", "d.jpg"):
        touch(tmp_path / "Manually_Annotated" / "validation" / "1" / name)
    csv_path = tmp_path / "validation.csv"
    csv_path.write_text("\n".join([
        AFFECTNET_HEADER,
        affectnet_line("1/a.jpg", "7"),  # 2: contempt
        affectnet_line("1/b.jpg", "9"),  # 3: uncertain -> dropped
        affectnet_line("1/c.jpg", "12"),  # 4: no such code
        affectnet_line("1/d.jpg", "sad"),  # 5: not a code
        affectnet_line("1/missing.jpg", "1"),  # 6: no image
        "1/d.jpg,1,2",  # 7: short row
        affectnet_line("1/d.jpg", "0"),  # 8: neutral
    ]) + "\n")

    result = read_samples("affectnet", tmp_path, "test")
    assert [(s.id, s.label, s.split) for s in result.samples] == [
        ("Manually_Annotated/validation/1/a.jpg", "contempt", "test"),
        ("Manually_Annotated/validation/1/d.jpg", "neutral", "test"),
    ]
    assert result.samples[0].candidate_labels == list(AFFECTNET.labels)
    assert result.dropped == [
        {"source": str(csv_path), "row": 3, "reason": "expression 9 (uncertain) is not an emotion"}
    ]
    errors = by_row(result.errors)
    assert sorted(errors) == [4, 5, 6, 7]
    assert all(e["source"] == str(csv_path) for e in result.errors)
    assert "code 12 is not one of 0-10" in errors[4]["reason"]
    assert "'sad' is not an integer" in errors[5]["reason"]
    assert "missing.jpg not found" in errors[6]["reason"]
    assert "malformed row" in errors[7]["reason"]
    assert counted(result) == 7


def test_affectnet_original_layout_without_header(tmp_path):
    touch(tmp_path / "Manually_Annotated" / "Manually_Annotated_Images" / "5" / "x.jpg")
    lists = tmp_path / "Manually_Annotated_file_lists"
    lists.mkdir()
    (lists / "validation.csv").write_text(affectnet_line("5/x.jpg", "3") + "\n")  # no header row
    (sample,) = read_samples("affectnet", tmp_path, "test").samples
    assert (sample.rel_path, sample.label) == ("Manually_Annotated/Manually_Annotated_Images/5/x.jpg", "surprise")


def test_affectnet_header_without_expression_is_clear(tmp_path):
    (tmp_path / "Manually_Annotated" / "validation").mkdir(parents=True)
    (tmp_path / "validation.csv").write_text("subDirectory_filePath,face_x\n1/a.jpg,3\n")
    with pytest.raises(ValueError, match=r"validation.csv: header lacks columns \['face_y'"):
        read_samples("affectnet", tmp_path, "test")


# ---------------------------------------------------------------- FER2013 + FER+ csv pair

VOTES_HEADER = "Usage,Image name,neutral,happiness,surprise,sadness,anger,disgust,fear,contempt,unknown,NF"


def pixels_of(value: int) -> str:
    return " ".join(str((value + i) % 256) for i in range(48 * 48))


def make_fer2013_pair(root: Path) -> list[tuple[str, str, str, str]]:
    # (Usage, pixels, Image name, votes); fer2013.csv's emotion column is unused by FER+ labels.
    rows = [
        ("Training", pixels_of(0), "fer0000000.png", "0,9,0,0,1,0,0,0,0,0"),  # 2: happy
        ("Training", pixels_of(1), "", "0,0,0,0,0,0,0,0,0,10"),  # 3: removed, not a face
        ("PublicTest", pixels_of(2), "fer0000001.png", "0,0,0,8,2,0,0,0,0,0"),  # 4: sad, valid
        ("PrivateTest", pixels_of(3), "fer0000002.png", "4,0,0,0,0,0,0,4,2,0"),  # 5: tie -> neutral
        ("PrivateTest", pixels_of(4), "fer0000003.png", "1,0,0,0,0,0,0,0,6,3"),  # 6: unknown -> dropped
        ("PrivateTest", pixels_of(5), "fer0000004.png", "0,0,0,0,2,0,0,1,0,7"),  # 7: NF -> dropped
        ("PrivateTest", "1 2 3", "fer0000005.png", "0,0,0,0,10,0,0,0,0,0"),  # 8: too few pixels
        ("PrivateTest", pixels_of(7), "fer0000006.png", "0,x,0,0,10,0,0,0,0,0"),  # 9: bad vote
        ("PrivateTest", pixels_of(8), "fer0000007.png", "0,0,0,0,0,1,0,9,0,0"),  # 10: contempt
        ("Elsewhere", pixels_of(9), "fer0000008.png", "10,0,0,0,0,0,0,0,0,0"),  # 11: unknown Usage
    ]
    with open(root / "fer2013.csv", "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["emotion", "pixels", "Usage"])
        writer.writerows([[0, pixels, usage] for usage, pixels, _, _ in rows])
    (root / "fer2013new.csv").write_text(
        VOTES_HEADER + "\n" + "".join(f"{usage},{name},{votes}\n" for usage, _, name, votes in rows)
    )
    return rows


def test_fer2013_pair_majority_labels_drops_and_errors(tmp_path):
    make_fer2013_pair(tmp_path)
    votes_file, pixels_file = str(tmp_path / "fer2013new.csv"), str(tmp_path / "fer2013.csv")

    result = read_samples("ferplus", tmp_path, "test")
    assert [(s.id, s.label, s.split) for s in result.samples] == [
        ("test/contempt/fer0000007.png", "contempt", "test"),
        ("test/neutral/fer0000002.png", "neutral", "test"),
    ]
    assert Image.open(io.BytesIO(result.samples[1].image)).getpixel((1, 0)) == 4  # pixels_of(3)[1]
    assert [(d["source"], d["row"]) for d in result.dropped] == [(votes_file, 6), (votes_file, 7)]
    assert "'unknown'" in result.dropped[0]["reason"] and "'NF'" in result.dropped[1]["reason"]
    errors = by_row(result.errors)
    assert sorted(errors) == [8, 9, 11]
    assert errors[8]["source"] == pixels_file and "2304 integers" in errors[8]["reason"]
    assert errors[9]["source"] == votes_file and "not all integers" in errors[9]["reason"]
    assert "'Elsewhere'" in errors[11]["reason"]
    assert counted(result) == 7  # six PrivateTest rows and the row of unknown Usage

    everything = read_samples("ferplus", tmp_path)
    assert {s.id: s.split for s in everything.samples} == {
        "train/happy/fer0000000.png": "train",
        "valid/sad/fer0000001.png": "valid",
        "test/neutral/fer0000002.png": "test",
        "test/contempt/fer0000007.png": "test",
    }
    assert (votes_file, 3) in [(d["source"], d["row"]) for d in everything.dropped]
    assert counted(everything) == 10


def test_fer2013_pair_of_unequal_length(tmp_path):
    make_fer2013_pair(tmp_path)
    with open(tmp_path / "fer2013.csv", "a") as f:
        f.write(f'0,"{pixels_of(1)}",PrivateTest\n')
    errors = read_samples("ferplus", tmp_path, "test").errors
    assert {"source": str(tmp_path / "fer2013.csv"), "row": 12,
            "reason": "no matching row in fer2013new.csv: the two files must have the same rows"} in errors


def test_convert_fer2013_pair_writes_pngs_and_error_files(tmp_path):
    root = tmp_path / "FERPlus"
    root.mkdir()
    make_fer2013_pair(root)
    out = tmp_path / "bench" / "ferplus_qa.json"

    report = convert_ferbench("ferplus", root, out, image_out=tmp_path / "images")
    assert report["samples"] == 2 and report["errors"] == 3 and report["dropped"] == 2
    assert report["images_written"] == 2
    png = tmp_path / "images" / "test" / "neutral" / "fer0000002.png"
    with Image.open(png) as image:
        assert (image.size, image.mode) == ((48, 48), "L")
        assert image.getpixel((47, 47)) == (3 + 48 * 48 - 1) % 256

    items = json.loads(out.read_text())
    assert [i["image_path"] for i in items] == ["/FERPlus/test/contempt/fer0000007.png",
                                                "/FERPlus/test/neutral/fer0000002.png"]
    assert items[1] == {
        "image_path": "/FERPlus/test/neutral/fer0000002.png",
        "true_label": "neutral",
        "prompt": ferbench_prompt(FERPLUS.labels),
        "candidate_labels": list(FERPLUS.labels),
    }
    assert report["errors_path"] == str(tmp_path / "bench" / "ferplus_qa.errors.jsonl")
    errors = [json.loads(line) for line in Path(report["errors_path"]).read_text().splitlines()]
    assert [e["row"] for e in errors] == [8, 9, 11]
    dropped = Path(report["dropped_path"]).read_text().splitlines()
    assert len(dropped) == 2


def test_convert_of_a_split_without_samples_fails_loudly(tmp_path):
    touch(tmp_path / "train" / "happy" / "a.png")
    (tmp_path / "test").mkdir()
    with pytest.raises(ValueError, match="no test samples of ferplus"):
        convert_ferbench("ferplus", tmp_path, tmp_path / "out.json")
    assert not (tmp_path / "out.json").exists()


def test_to_ferbench_items_needs_rel_path(tmp_path):
    touch(tmp_path / "a" / "x.png")
    (sample,) = read_samples("folder", tmp_path).samples
    assert to_ferbench_items([sample], "/")[0]["image_path"] == "/a/x.png"
    sample.rel_path = ""
    with pytest.raises(ValueError, match="'a/x.png'.*no rel_path"):
        to_ferbench_items([sample], "/data")
