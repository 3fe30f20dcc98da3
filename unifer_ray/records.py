"""Record files and error records: what every reader and writer of items, results and ledgers shares.

- `read_records`: the rows of a JSON array (the released and reference files), JSONL or Parquet file, local or
  s3://, numbered as a person finds them: a JSON array's index, a JSONL line number, a Parquet row index.
- `write_jsonl`: JSON Lines, UTF-8 text as is, written whole or not at all (`jsonl_text` for other writers).
- `append_jsonl` / `read_log`: the local logs a run appends to (metrics, samples, errors).
- `ErrorRecord`: why one row or image was not used, {source, row, id, reason}, in every errors table.
- `object_array`: a batch column holding one list, dict or array per row, as Ray Data's numpy batches hold them.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq

from unifer_ray import storage

PARQUET_BATCH_ROWS = 4096


@dataclass(frozen=True)
class ErrorRecord:
    source: str  # the file, folder or image the bad row came from
    reason: str
    row: int | str | None = None  # row number in `source` (a file name in folder sources); None: not row-based
    id: str | None = None  # the item's id; None where the source has no ids yet

    def to_dict(self) -> dict:
        """The record as the errors tables write it: `source`, then `row` and `id` where known, then `reason`."""
        fields = {"source": self.source, "row": self.row, "id": self.id}
        return {k: v for k, v in fields.items() if v is not None} | {"reason": self.reason}


def object_array(values: list) -> np.ndarray:
    """A 1-D object array, even of equal-length lists or arrays (np.array would stack those into 2-D)."""
    arr = np.empty(len(values), dtype=object)
    arr[:] = values
    return arr


def read_records(path: str) -> Iterator[tuple[int, object]]:
    """(row number, raw row) pairs of one file, streamed for Parquet.

    A malformed JSONL line comes out as (line number, its JSONDecodeError), so a caller can report it and go on;
    an unreadable file or a malformed JSON array raises.
    """
    if path.endswith(".parquet"):
        fs, inner = storage.filesystem(path)
        batches = pq.ParquetFile(fs.open_input_file(inner)).iter_batches(batch_size=PARQUET_BATCH_ROWS)
        yield from enumerate(row for batch in batches for row in batch.to_pylist())
        return
    text = storage.read_text(path)
    if text.lstrip().startswith("["):
        try:
            items = json.loads(text)
        except json.JSONDecodeError as exc:
            raise ValueError(f"{path}: not a valid JSON array: {exc}") from None
        yield from enumerate(items)
        return
    for lineno, line in enumerate(text.splitlines(), start=1):
        if line.strip():
            try:
                yield lineno, json.loads(line)
            except json.JSONDecodeError as exc:
                yield lineno, exc


def jsonl_text(rows: Iterable[dict]) -> str:
    """One JSON object a line, UTF-8 text as is (escaping every non-ASCII character helps no reader)."""
    return "".join(json.dumps(r, ensure_ascii=False, default=str) + "\n" for r in rows)


def write_jsonl(uri: str, rows: Iterable[dict]) -> None:
    """An empty `rows` still writes the file, so that a file of an earlier run never speaks for this one."""
    storage.write_text(uri, jsonl_text(rows))


def append_jsonl(path: Path, rows: Iterable[dict]) -> None:
    """Append to a local log (a resumed run adds to its history)."""
    text = jsonl_text(rows)
    if text:
        with open(path, "a", encoding="utf-8") as f:
            f.write(text)


def read_log(path: Path) -> list[dict]:
    """Every complete record of a local JSONL log (none when it does not exist yet). A last line without its newline
    is still being appended by a running job and is left for the next read; a malformed whole line raises."""
    if not path.exists():
        return []
    text = path.read_text(encoding="utf-8")
    records = []
    for lineno, line in enumerate(text[: text.rfind("\n") + 1].splitlines(), start=1):
        if line.strip():
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError as exc:
                raise ValueError(f"{path}:{lineno}: not a JSON record: {exc}") from None
    return records
