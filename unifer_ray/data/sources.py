"""Adapters from each FER dataset's own layout on disk to FerSample rows.

Layouts (each below its dataset root; the data root holds the roots under the names FERBench paths use):
- RAF-DB:    EmoLabel/list_patition_label.txt ("test_0001.jpg 5", codes 1-7) and aligned/<name>_aligned.jpg
             (or the original Image/aligned/); split from the name prefix train_/test_.
- FERPlus:   <split>/<label>/fer<7 digits>.png with split train/valid/test, or the official pair fer2013.csv
             (emotion, pixels, Usage) + fer2013new.csv (Usage, Image name, 10 vote counts); label = majority vote.
- AffectNet: training.csv / validation.csv (or Manually_Annotated_file_lists/*.csv), images in
             Manually_Annotated/training|validation/ (or the original Manually_Annotated/Manually_Annotated_Images/);
             validation is the test split; expression codes 8-10 (none, uncertain, non-face) are dropped.
- SFEW 2.0:  Train/Train_Aligned_Faces/<Label>/*.png and Val/Val_Aligned_Faces/<Label>/*.png; Val is the test split.
- folder:    <root>/<label>/*.{jpg,jpeg,png,bmp,webp}; one split.

Images are not decoded here (the benchmark validates them). Every row of the requested split ends up in exactly
one of `samples`, `errors` (the row is wrong) or `dropped` (the dataset itself excludes it), each problem as a
record {"source": file or folder, "row": line number or file name, "reason": ...}.
"""

from __future__ import annotations

import csv
import io
import os
from dataclasses import dataclass, field
from pathlib import Path

from PIL import Image

from unifer_ray.data.schema import FerSample
from unifer_ray.labels import AFFECTNET, FERPLUS, RAFDB, SFEW, label_in
from unifer_ray.records import ErrorRecord
from unifer_ray.registry import lookup

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".webp")

LAYOUTS = {
    "rafdb": "EmoLabel/list_patition_label.txt and aligned/<name>_aligned.jpg (or Image/aligned/)",
    "ferplus": "<split>/<label>/*.png with split in train/valid/test, or fer2013.csv + fer2013new.csv",
    "affectnet": "training.csv / validation.csv (or Manually_Annotated_file_lists/*.csv) and "
    "Manually_Annotated/training|validation/ (or Manually_Annotated/Manually_Annotated_Images/)",
    "sfew": "Train/Train_Aligned_Faces/<Label>/*.png and Val/Val_Aligned_Faces/<Label>/*.png",
    "folder": "<root>/<label>/*.{jpg,jpeg,png,bmp,webp}",
}

FER2013_COLUMNS = ("emotion", "pixels", "Usage")
FERPLUS_VOTE_COLUMNS = (
    "neutral", "happiness", "surprise", "sadness", "anger", "disgust", "fear", "contempt", "unknown", "NF",
)
FER2013_SPLITS = {"Training": "train", "PublicTest": "valid", "PrivateTest": "test"}
FER2013_SIZE = 48

AFFECTNET_COLUMNS = (
    "subDirectory_filePath", "face_x", "face_y", "face_width", "face_height", "facial_landmarks",
    "expression", "valence", "arousal",
)
AFFECTNET_CSV = {"train": "training", "test": "validation"}
AFFECTNET_DROPPED = {8: "none", 9: "uncertain", 10: "non-face"}


@dataclass
class SourceResult:
    samples: list[FerSample] = field(default_factory=list)
    errors: list[dict] = field(default_factory=list)  # rows that are wrong: fix the data
    dropped: list[dict] = field(default_factory=list)  # rows the dataset's own rules exclude

    def add_error(self, source: str | Path, row: int | str, reason: str) -> None:
        self.errors.append(ErrorRecord(str(source), reason, row=row).to_dict())

    def add_dropped(self, source: str | Path, row: int | str, reason: str) -> None:
        self.dropped.append(ErrorRecord(str(source), reason, row=row).to_dict())


def read_samples(
    dataset: str, root: str | Path, split: str | None = None, *, labels: list[str] | None = None
) -> SourceResult:
    """All samples of `split` (every split when None) of a dataset laid out below `root`, sorted by id.

    `labels` is the candidate list of a generic folder (default: its sorted subfolder names); a folder dataset
    is one split, whose samples carry `split` (default "test").
    """
    lookup(LAYOUTS, dataset, "dataset layout")
    if labels is not None and dataset != "folder":
        raise ValueError(f"labels= applies to the 'folder' layout only; {dataset} has its own label list")
    root = Path(os.path.abspath(Path(root).expanduser()))
    if not root.is_dir():
        raise FileNotFoundError(f"{dataset} root {root} is not a directory; expected {LAYOUTS[dataset]} below it")

    out = SourceResult()
    if dataset == "rafdb":
        _read_rafdb(root, split, out)
    elif dataset == "ferplus":
        if (root / "fer2013new.csv").is_file():
            _read_fer2013_csv(root, split, out)
        else:
            split_dirs = {s: root / s for s in ("train", "valid", "test")}
            _read_split_folders(out, "ferplus", root, split, split_dirs, {x: x for x in FERPLUS.labels})
    elif dataset == "affectnet":
        _read_affectnet(root, split, out)
    elif dataset == "sfew":
        split_dirs = {"train": root / "Train" / "Train_Aligned_Faces", "test": root / "Val" / "Val_Aligned_Faces"}
        _read_split_folders(out, "sfew", root, split, split_dirs, {x.capitalize(): x for x in SFEW.labels})
    else:
        _read_folder(root, split, labels, out)
    out.samples.sort(key=lambda s: s.id)
    return out


def _sample(
    dataset: str, split: str, image: Path | bytes, rel_path: str, label: str, labels: tuple | list
) -> FerSample:
    # The path below the dataset root is unique and stable, so it is the id.
    return FerSample(
        id=rel_path,
        dataset=dataset,
        split=split,
        image=image if isinstance(image, bytes) else str(image),
        label=label,
        candidate_labels=list(labels),
        rel_path=rel_path,
    )


def _check_split(dataset: str, split: str | None, splits) -> None:
    if split is not None and split not in splits:
        raise ValueError(f"{dataset} has no split {split!r}; expected one of {sorted(splits)}")


def _splits_present(dataset: str, root: Path, split: str | None, paths: dict[str, Path | None]) -> list[str]:
    """The requested split, or every split present when none is requested; a missing requested split raises."""
    _check_split(dataset, split, paths)
    wanted = [split] if split is not None else [s for s, p in paths.items() if p is not None]
    missing = [s for s in wanted if paths[s] is None]
    if missing or not wanted:
        raise FileNotFoundError(
            f"{dataset} root {root} has no {missing[0] + ' split' if missing else 'split'}; "
            f"expected {LAYOUTS[dataset]}"
        )
    return wanted


def _first_existing(candidates: list[Path], is_dir: bool) -> Path | None:
    for path in candidates:
        if path.is_dir() if is_dir else path.is_file():
            return path
    return None


def _code_label(text: str, labels: tuple[str, ...], first_code: int) -> str | None:
    """The label a numeric code stands for (labels[0] has `first_code`), or None for a bad code."""
    try:
        index = int(text) - first_code
    except ValueError:
        return None
    return labels[index] if 0 <= index < len(labels) else None


def _read_rafdb(root: Path, split: str | None, out: SourceResult) -> None:
    _check_split("rafdb", split, ("train", "test"))
    label_file = root / "EmoLabel" / "list_patition_label.txt"
    if not label_file.is_file():
        raise FileNotFoundError(f"RAF-DB label file {label_file} not found; expected {LAYOUTS['rafdb']}")
    image_dir = _first_existing([root / "aligned", root / "Image" / "aligned"], is_dir=True)
    if image_dir is None:
        raise FileNotFoundError(f"RAF-DB root {root} has no aligned/ (or Image/aligned/) image folder")
    with label_file.open(encoding="utf-8") as f:
        for line_no, line in enumerate(f, start=1):
            fields = line.split()
            if not fields:
                continue
            name = fields[0]
            row_split = "train" if name.startswith("train_") else "test" if name.startswith("test_") else None
            if split is not None and row_split is not None and row_split != split:
                continue
            if len(fields) != 2 or row_split is None or not name.endswith(".jpg"):
                reason = f"malformed line {line.strip()!r}: expected '<train_|test_>name.jpg <code 1-7>'"
                out.add_error(label_file, line_no, reason)
                continue
            label = _code_label(fields[1], RAFDB.labels, first_code=1)
            if label is None:
                out.add_error(label_file, line_no, f"label code {fields[1]!r} is not one of 1-7")
                continue
            image = image_dir / (name[: -len(".jpg")] + "_aligned.jpg")
            if not image.is_file():
                out.add_error(label_file, line_no, f"image {image} not found")
                continue
            rel_path = image.relative_to(root).as_posix()
            out.samples.append(_sample("rafdb", row_split, image, rel_path, label, RAFDB.labels))


def _read_split_folders(
    out: SourceResult, dataset: str, root: Path, split: str | None,
    split_dirs: dict[str, Path], folder_labels: dict[str, str],
) -> None:
    present = {s: d if d.is_dir() else None for s, d in split_dirs.items()}
    labels = list(folder_labels.values())
    for s in _splits_present(dataset, root, split, present):
        _read_label_folders(out, dataset, s, root, split_dirs[s], folder_labels, labels)


def _read_label_folders(
    out: SourceResult, dataset: str, split: str, root: Path, split_dir: Path,
    folder_labels: dict[str, str], labels: list[str],
) -> None:
    """Samples from split_dir/<folder>/<image>, each folder naming a label; images in any other folder are errors."""
    folders = sorted(p for p in split_dir.iterdir() if p.is_dir() and not p.name.startswith("."))
    for folder in folders:
        label = folder_labels.get(folder.name)
        images = sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_EXTENSIONS and p.is_file())
        for image in images:
            if label is None:
                reason = f"folder {folder.name!r} is not a label; expected one of {sorted(folder_labels)}"
                out.add_error(folder, image.name, reason)
            else:
                rel_path = image.relative_to(root).as_posix()
                out.samples.append(_sample(dataset, split, image, rel_path, label, labels))


def _read_folder(root: Path, split: str | None, labels: list[str] | None, out: SourceResult) -> None:
    if labels is None:
        labels = sorted(p.name for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    if not labels:
        raise ValueError(f"image folder {root} has no label subfolders; expected {LAYOUTS['folder']}")
    _read_label_folders(out, root.name, split or "test", root, root, {x: x for x in labels}, list(labels))


def _dict_rows(f, columns: tuple[str, ...], source: Path, header_optional: bool = False) -> csv.DictReader:
    """A DictReader over `f` that has `columns`; a file without a header row is read in `columns` order if allowed."""
    first_line = f.readline()
    f.seek(0)
    has_header = first_line.split(",", 1)[0].strip().strip('"') == columns[0]
    if not has_header and header_optional:
        return csv.DictReader(f, fieldnames=list(columns))
    reader = csv.DictReader(f)
    missing = [c for c in columns if c not in (reader.fieldnames or [])]
    if missing:
        raise ValueError(f"{source}: header lacks columns {missing}; expected columns {list(columns)}")
    return reader


def _read_affectnet(root: Path, split: str | None, out: SourceResult) -> None:
    csv_paths = {
        s: _first_existing([root / f"{stem}.csv", root / "Manually_Annotated_file_lists" / f"{stem}.csv"], is_dir=False)
        for s, stem in AFFECTNET_CSV.items()
    }
    for s in _splits_present("affectnet", root, split, csv_paths):
        csv_path = csv_paths[s]
        stem = AFFECTNET_CSV[s]
        images = root / "Manually_Annotated"
        image_dir = _first_existing([images / stem, images / "Manually_Annotated_Images"], is_dir=True)
        if image_dir is None:
            raise FileNotFoundError(
                f"AffectNet root {root} has neither {images / stem} nor {images / 'Manually_Annotated_Images'}"
            )
        with csv_path.open(encoding="utf-8-sig", newline="") as f:
            reader = _dict_rows(f, AFFECTNET_COLUMNS, csv_path, header_optional=True)
            for row in reader:
                _affectnet_row(row, reader.line_num, csv_path, s, root, image_dir, out)


def _affectnet_row(
    row: dict, line: int, csv_path: Path, split: str, root: Path, image_dir: Path, out: SourceResult
) -> None:
    sub_path, expression = row.get("subDirectory_filePath"), row.get("expression")
    if not sub_path or expression is None:
        out.add_error(csv_path, line, f"malformed row: expected the columns {list(AFFECTNET_COLUMNS)}")
        return
    try:
        code = int(expression)
    except ValueError:
        out.add_error(csv_path, line, f"expression {expression!r} is not an integer code")
        return
    if code in AFFECTNET_DROPPED:
        out.add_dropped(csv_path, line, f"expression {code} ({AFFECTNET_DROPPED[code]}) is not an emotion")
        return
    label = _code_label(expression, AFFECTNET.labels, first_code=0)
    if label is None:
        out.add_error(csv_path, line, f"expression code {code} is not one of 0-10")
        return
    image = image_dir / sub_path.strip()
    if not image.is_file():
        out.add_error(csv_path, line, f"image {image} not found")
        return
    out.samples.append(_sample("affectnet", split, image, image.relative_to(root).as_posix(), label, AFFECTNET.labels))


def _read_fer2013_csv(root: Path, split: str | None, out: SourceResult) -> None:
    """The official FER+ pair: fer2013new.csv has one row of votes per row of fer2013.csv, in the same order."""
    _check_split("ferplus", split, FER2013_SPLITS.values())
    votes_file, pixels_file = root / "fer2013new.csv", root / "fer2013.csv"
    if not pixels_file.is_file():
        raise FileNotFoundError(f"{pixels_file} not found: {votes_file} needs the pixels of fer2013.csv beside it")
    with (
        pixels_file.open(encoding="utf-8-sig", newline="") as pf,
        votes_file.open(encoding="utf-8-sig", newline="") as vf,
    ):
        pixel_rows = _dict_rows(pf, FER2013_COLUMNS, pixels_file)
        vote_rows = _dict_rows(vf, ("Usage", "Image name", *FERPLUS_VOTE_COLUMNS), votes_file)
        # Both files hold one image per line, so a row's line number is the same in both.
        line = 1
        while True:
            pixel_row, vote_row = next(pixel_rows, None), next(vote_rows, None)
            if pixel_row is None and vote_row is None:
                break
            line += 1
            _fer2013_row(pixel_row, vote_row, line, pixels_file, votes_file, split, out)


def _fer2013_row(
    pixel_row: dict | None, vote_row: dict | None, line: int,
    pixels_file: Path, votes_file: Path, split: str | None, out: SourceResult,
) -> None:
    if pixel_row is None or vote_row is None:
        missing_in, present_in = (pixels_file, votes_file) if pixel_row is None else (votes_file, pixels_file)
        out.add_error(present_in, line, f"no matching row in {missing_in.name}: the two files must have the same rows")
        return
    usage = vote_row["Usage"]
    row_split = FER2013_SPLITS.get(usage)
    if row_split is None or pixel_row["Usage"] != usage:
        both = f"{usage!r} in fer2013new.csv, {pixel_row['Usage']!r} in fer2013.csv"
        reason = f"Usage {both}: expected the same one of {sorted(FER2013_SPLITS)}"
        out.add_error(votes_file, line, reason)
        return
    if split is not None and row_split != split:
        return
    try:
        votes = [int(vote_row[c]) for c in FERPLUS_VOTE_COLUMNS]
    except (TypeError, ValueError):
        found = [vote_row[c] for c in FERPLUS_VOTE_COLUMNS]
        out.add_error(votes_file, line, f"vote counts {found} are not all integers")
        return
    name = (vote_row["Image name"] or "").strip()
    if not name:
        out.add_dropped(votes_file, line, "FER+ names no image for this row (removed: not a face)")
        return
    if max(votes) <= 0:
        out.add_error(votes_file, line, "no votes")
        return
    # Majority = most votes; a tie goes to the earlier column, like FER+'s own argmax.
    winner = FERPLUS_VOTE_COLUMNS[votes.index(max(votes))]
    if winner in ("unknown", "NF"):
        out.add_dropped(votes_file, line, f"majority vote is {winner!r}, not an emotion")
        return
    if "/" in name or "\\" in name:
        out.add_error(votes_file, line, f"Image name {name!r} is not a plain file name")
        return
    try:
        pixels = bytes(int(v) for v in (pixel_row["pixels"] or "").split())
    except ValueError:
        pixels = b""  # a value outside 0-255 or not a number
    if len(pixels) != FER2013_SIZE * FER2013_SIZE:
        out.add_error(pixels_file, line, f"pixels must be {FER2013_SIZE * FER2013_SIZE} integers in 0-255")
        return
    label = label_in(winner, FERPLUS.labels)
    rel_path = f"{row_split}/{label}/{name}"
    out.samples.append(_sample("ferplus", row_split, _png(pixels), rel_path, label, FERPLUS.labels))


def _png(pixels: bytes) -> bytes:
    buf = io.BytesIO()
    Image.frombytes("L", (FER2013_SIZE, FER2013_SIZE), pixels).save(buf, format="PNG")
    return buf.getvalue()
