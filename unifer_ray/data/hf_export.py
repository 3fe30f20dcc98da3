"""Curated sets and FERBench results as Hugging Face datasets, ready for `push_to_hub` / `hf upload`:

    <out>/data/<split>-00000-of-00002.parquet ...   the rows, in shards
    <out>/README.md                                 the dataset card: YAML metadata (configs, features, split sizes)
                                                    and what the fields are, counts, and how the rows were made

The CoT and RLVR sets keep their released columns (`image_path, question, response` / `image_path, problem,
solution`) and ours (`id, dataset, teacher` / `id, dataset, task`); only valid items are written, as the training-set
readers read them, so `read_cot` / `read_rlvr` read the dataset back. Images stay where the items' image_path names
them, as in the paper's released files. Results keep every column of `results.jsonl`, one row per item and model.
"""

from __future__ import annotations

import json
import posixpath
from collections import Counter
from collections.abc import Iterable, Iterator

import pyarrow as pa
import pyarrow.parquet as pq

from unifer_ray import storage
from unifer_ray.data.training_sets import COT, RLVR, training_files, validate_item
from unifer_ray.records import read_records
from unifer_ray.registry import lookup

SET_FORMATS = {"cot": COT, "rlvr": RLVR}
SET_TITLES = {"cot": "UniFER CoT set", "rlvr": "UniFER RLVR set"}
FIELD_DOCS = {
    "image_path": "the image, below the directory that holds the source datasets (/RAF-DB/aligned/x.jpg)",
    "question": "the FERBench question the model is asked",
    "response": "the teacher's trace: <think>reasoning</think><answer>label</answer>",
    "problem": "the verifiable question",
    "solution": "the answer a reward checks: <answer>label</answer> (or yes/no)",
    "id": "<dataset>:<image_path>#<trace or task>, unique",
    "dataset": "the source dataset (rafdb, ferplus, affectnet, sfew, or a new one's name)",
    "teacher": "the model or rule that wrote the trace",
    "task": "mc, mc_shuffled, binary or unified",
    "model": "the benchmarked model's name",
    "true_label": "the item's label",
    "candidate_labels": "the labels the question offers, in its order",
    "parsed_strict": "the answer read from <answer></answer> alone (null: none)",
    "parsed_paper": "the answer read as the paper's evaluation reads it (null: none)",
    "correct_strict": "parsed_strict is the true label",
    "correct_paper": "parsed_paper is the true label",
    "format_ok": "one <think></think> block, then one <answer></answer> block",
    "status": "scored, or error (then `error` says why)",
}
ROWS_PER_SHARD = 50_000


def export_training_set(kind: str, paths: str | list[str], out_dir: str, *, made: dict | None = None,
                        rows_per_shard: int = ROWS_PER_SHARD) -> dict:
    """Write the valid items of a CoT or RLVR set (files or directories, as read_cot/read_rlvr take them) as a
    Hugging Face dataset with one split, `train`. `made`: how the set was made (default: the stats.json beside the
    items directory, as the curation pipelines write it). Returns {rows, skipped, shards, card}."""
    fmt = lookup(SET_FORMATS, kind, "training set kind")
    files = training_files(paths)
    if made is None:
        made = _stats_beside(paths)
    columns = ["image_path", *fmt.text_fields, "id", "dataset", fmt.extra_field]
    schema = pa.schema([(c, pa.string()) for c in columns])
    skipped = Counter()

    def tables() -> Iterator[pa.Table]:
        rows = []
        for path in files:
            for row, raw in read_records(path):
                try:
                    item = validate_item(raw, fmt, source=path, row=row, image_root=None)
                except ValueError:
                    skipped[path] += 1
                    continue
                rows.append({c: item[c] for c in columns})
                if len(rows) == rows_per_shard:
                    yield pa.Table.from_pylist(rows, schema=schema)
                    rows = []
        if rows:
            yield pa.Table.from_pylist(rows, schema=schema)

    counted = ("dataset", fmt.extra_field)
    report = write_hf_dataset(tables(), out_dir, split="train", counted=counted,
                              title=SET_TITLES[kind], fields=columns, made=made,
                              source=", ".join(files[:5]) + (f" and {len(files) - 5} more" if len(files) > 5 else ""))
    return report | {"skipped": sum(skipped.values())}


def export_results(bench_out_dir: str, out_dir: str, *, rows_per_shard: int = ROWS_PER_SHARD) -> dict:
    """Write the FERBench results of every model of a benchmark run (`<bench_out_dir>/results/<model>/
    results.jsonl`) as a Hugging Face dataset with one split, `test`: one row per item and model."""
    files = [f for f in storage.list_files(storage.join(bench_out_dir, "results"), "results.jsonl")]
    if not files:
        raise FileNotFoundError(f"no results/<model>/results.jsonl below {bench_out_dir}: not a benchmark's out_dir")
    # Results are one row per benchmark item: small enough to unify their column types in memory.
    table = pa.concat_tables([pa.Table.from_pylist([r for _, r in read_records(f)]) for f in files],
                             promote_options="default")
    summary = storage.join(bench_out_dir, "summary.json")
    made = json.loads(storage.read_text(summary)) if storage.exists(summary) else {}
    shards = (table.slice(start, rows_per_shard) for start in range(0, table.num_rows, rows_per_shard))
    return write_hf_dataset(shards, out_dir, split="test", counted=("model", "dataset"), title="FERBench results",
                            fields=table.column_names, made=made, source=bench_out_dir)


def _stats_beside(paths: str | list[str]) -> dict:
    """The stats.json of the curation run whose items directory `paths` is, if it is one."""
    if not isinstance(paths, str):
        return {}
    stats = storage.join(posixpath.dirname(paths.rstrip("/")), "stats.json")
    return json.loads(storage.read_text(stats)) if storage.exists(stats) else {}


def write_hf_dataset(tables: Iterable[pa.Table], out_dir: str, *, split: str, counted: tuple[str, ...], title: str,
                     fields: list[str], made: dict, source: str) -> dict:
    """Shards of `tables` (one each) below `out_dir`/data and the dataset card; an earlier export is replaced."""
    import datasets
    from huggingface_hub import DatasetCard, DatasetCardData

    data_dir = storage.join(out_dir, "data")
    for old in storage.list_files(data_dir, ".parquet"):
        fs, path = storage.filesystem(old)
        fs.delete_file(path)
    written, counts, schema = [], {c: Counter() for c in counted}, None
    for i, table in enumerate(tables):
        shard = storage.join(data_dir, f"{split}-{i:05d}.parquet")
        fs, path = storage.filesystem(shard)
        fs.create_dir(posixpath.dirname(path), recursive=True)
        pq.write_table(table, path, filesystem=fs)
        written.append((shard, table.num_rows))
        schema = table.schema
        for c in counted:
            counts[c].update(table.column(c).to_pylist())
    if not written:
        raise ValueError(f"nothing to write to {out_dir}: no valid rows in {source}")
    # Hub convention: <split>-<index>-of-<total>.parquet, so that the total is in every name.
    shards = []
    for i, (shard, _) in enumerate(written):
        final = storage.join(data_dir, f"{split}-{i:05d}-of-{len(written):05d}.parquet")
        fs, path = storage.filesystem(shard)
        fs.move(path, storage.filesystem(final)[1])
        shards.append(final)
    rows = sum(n for _, n in written)
    info = datasets.DatasetInfo(features=datasets.Features.from_arrow_schema(schema),
                                splits=datasets.SplitDict.from_split_dict([{"name": split, "num_examples": rows}]))
    card_data = DatasetCardData(
        pretty_name=title, tags=["facial-expression-recognition", "unifer"],
        configs=[{"config_name": "default", "data_files": [{"split": split, "path": f"data/{split}-*.parquet"}]}],
    )
    datasets.info.DatasetInfosDict({"default": info}).to_dataset_card_data(card_data)
    text = _card_text(title, split, rows, fields, counts, made, source)
    card = DatasetCard(f"---\n{card_data.to_yaml()}\n---\n{text}")
    card_path = storage.join(out_dir, "README.md")
    storage.write_text(card_path, str(card))
    return {"rows": rows, "shards": shards, "card": card_path}


def _card_text(title: str, split: str, rows: int, fields: list[str], counts: dict[str, Counter], made: dict,
               source: str) -> str:
    lines = [f"# {title}", "", f"{rows} rows in the `{split}` split, written by `unifer export` from {source}.", "",
             "## Fields", "", "| field | what it is |", "| --- | --- |"]
    lines += [f"| `{f}` | {FIELD_DOCS.get(f, '')} |" for f in fields]
    for column, counter in counts.items():
        lines += ["", f"## Rows by {column}", "", f"| {column} | rows |", "| --- | --- |"]
        lines += [f"| {value} | {n} |" for value, n in sorted(counter.items(), key=lambda kv: str(kv[0]))]
    lines += ["", "## How it was made", ""]
    if made:
        lines += ["The run's own record (the curation's stats.json, or the benchmark's summary.json):", "",
                  "```json", json.dumps(made, indent=2), "```"]
    else:
        lines += ["No record of the run was found beside the input."]
    return "\n".join(lines) + "\n"
