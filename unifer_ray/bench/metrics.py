"""FERBench scoring: result rows -> accuracy, bootstrap CI, macro P/R/F1, per-class table, confusion matrix.

Two kinds of result files score the same way, from the parsed columns of `parsing.parsed_columns`:
- ours (Parquet or JSONL, written by the benchmark runner): `model`, `dataset`, `true_label`, `candidate_labels`,
  `response`, and the runner's `parsed_strict`, `parsed_paper`, `format_ok`, which are scored as they are;
- the reference format (the paper's inference scripts): a JSON array of FERBench items plus `model_response` and
  maybe `error`; its responses are parsed as the runner parses, on reading. The dataset comes from the candidate
  list, the model name from `model_names` or the file name.

Rows with a truthy `error` (failed inference) are excluded from the metrics and counted, as the reference does.
"""

from __future__ import annotations

import json
import posixpath
from dataclasses import dataclass, field

import numpy as np
import pyarrow.fs as pafs
from scipy.stats import binomtest
from sklearn.metrics import precision_recall_fscore_support

from unifer_ray import storage
from unifer_ray.labels import CANONICAL, DATASETS, canonical, dataset_of
from unifer_ray.parsing import UNKNOWN, parsed_columns
from unifer_ray.records import ErrorRecord, read_records

MODES = ("strict", "paper")
PARSED_COLUMNS = ("parsed_strict", "parsed_paper", "format_ok")
OUR_COLUMNS = ("response", "dataset", *PARSED_COLUMNS)  # required in our rows, beside the labels
OVERALL = "overall"  # the key of the pooled scores, next to the dataset keys
BOOTSTRAP_RESAMPLES = 1000
BOOTSTRAP_SEED = 0


@dataclass
class ResultRows:
    rows: list[dict] = field(default_factory=list)  # normalised rows, failed inferences included (`error` set)
    errors: list[dict] = field(default_factory=list)  # malformed rows, as ErrorRecord.to_dict()


# ---------------------------------------------------------------- reading result files


def model_name_from_path(path: str) -> str:
    """A reference file's model: its stem without the paper's `<dataset>_` prefix and `_results` suffix,
    so that `rafdb_unifer_7b_results.json` and `sfew_2.0_unifer_7b_results.json` are both `unifer_7b`."""
    stem = posixpath.basename(path).rsplit(".", 1)[0]
    for spec in DATASETS.values():
        prefix = spec.ferbench_file.removesuffix("_qa.json") + "_"
        if stem.startswith(prefix) and len(stem) > len(prefix):
            stem = stem[len(prefix):]
            break
    return stem.removesuffix("_results") or stem


def _normalise_row(raw: object, *, source: str, row: int, model_name: str | None) -> dict:
    """One result row (ours or the reference format) in our columns; raises ValueError saying what is wrong."""
    reference, candidates, response = _checked_fields(raw)
    dataset, model = _dataset_and_model(raw, candidates, reference, source=source, model_name=model_name)
    error = raw.get("error") or ""
    if error is True:  # the reference scripts flag a failure with True and write the message as the response
        error = response or "error"
    row_id = raw.get("id") or (f"{dataset}:{raw['image_path']}" if raw.get("image_path") else f"{source}#{row}")
    parsed = parsed_columns(response, candidates, dataset) if reference else {k: raw[k] for k in PARSED_COLUMNS}
    return {
        "id": str(row_id), "model": model, "dataset": dataset, "true_label": raw["true_label"],
        "candidate_labels": list(candidates), "response": response or "", "error": str(error),
        "source": source, "row": row,
    } | parsed


def _checked_fields(raw: object) -> tuple[bool, list[str], str | None]:
    """Whether `raw` is a reference row, its candidate labels and its response, once its fields are checked."""
    if isinstance(raw, json.JSONDecodeError):
        raise ValueError(f"malformed JSON: {raw}")
    if not isinstance(raw, dict):
        raise ValueError(f"a result row must be an object, got {type(raw).__name__}")
    reference = "response" not in raw and "model_response" in raw
    required = ("true_label", "candidate_labels") + (("model_response",) if reference else OUR_COLUMNS)
    missing = [k for k in required if k not in raw]
    if missing:
        raise ValueError(f"missing field(s) {missing} (neither our result row nor a reference row)")
    candidates = raw["candidate_labels"]
    if not isinstance(candidates, list) or not candidates or not all(isinstance(c, str) for c in candidates):
        raise ValueError("field 'candidate_labels' must be a non-empty list of strings")
    if raw["true_label"] not in candidates:
        raise ValueError(f"true_label {raw['true_label']!r} is not among candidate_labels {candidates}")
    response = raw["model_response" if reference else "response"]
    if response is not None and not isinstance(response, str):
        raise ValueError(f"the response must be a string, got {type(response).__name__}")
    return reference, candidates, response


def _dataset_and_model(raw: dict, candidates: list[str], reference: bool, *, source: str,
                       model_name: str | None) -> tuple[str, str]:
    """A reference row's dataset comes from its candidates, its model from `model_name` or the file name; ours
    carry both (`model_name` wins)."""
    if reference:
        dataset = dataset_of(candidates)
        if dataset is None:
            raise ValueError(f"candidate_labels {candidates} match no FERBench dataset")
        return dataset, model_name or model_name_from_path(source)
    dataset, model = raw["dataset"], model_name or raw.get("model")
    if not isinstance(dataset, str) or not dataset or dataset == OVERALL:
        raise ValueError(f"field 'dataset' must be a non-empty string other than {OVERALL!r}, got {dataset!r}")
    if not isinstance(model, str) or not model:
        raise ValueError("field 'model' is missing or empty, and no model name was given for this file")
    return dataset, model


def _result_files(path: str) -> list[str]:
    fs, inner = storage.filesystem(path)
    kind = fs.get_file_info(inner).type
    if kind == pafs.FileType.NotFound:
        raise FileNotFoundError(f"result file not found: {path}")
    if kind != pafs.FileType.Directory:
        return [path]
    # A directory is a Parquet dataset (as Ray Data writes one); its other files (errors.jsonl...) are not results.
    files = storage.list_files(path, ".parquet")
    if not files:
        raise ValueError(f"{path}: a directory without .parquet result files")
    return files


def read_results(path: str, model_name: str | None = None) -> ResultRows:
    """Normalised rows of a result file (.parquet, .jsonl, or a .json array) or of a directory of Parquet files;
    bad rows become error records."""
    out = ResultRows()
    for source in _result_files(str(path)):
        for row, raw in read_records(source):
            try:
                out.rows.append(_normalise_row(raw, source=source, row=row, model_name=model_name))
            except ValueError as exc:
                row_id = raw.get("id") if isinstance(raw, dict) else None
                out.errors.append(ErrorRecord(source, str(exc), row=row, id=row_id).to_dict())
    return out


# ---------------------------------------------------------------- metrics


def predict(row: dict, mode: str) -> str:
    """The row's predicted label under `mode`; "unknown" when the response names none."""
    if mode not in MODES:
        raise ValueError(f"unknown scoring mode {mode!r}; expected one of {MODES}")
    return row[f"parsed_{mode}"] or UNKNOWN


def bootstrap_ci(correct: int, n: int, resamples: int = BOOTSTRAP_RESAMPLES, seed: int = BOOTSTRAP_SEED
                 ) -> list[float]:
    """95% percentile-bootstrap interval of an accuracy of correct/n.

    Resampling n 0/1 outcomes with replacement makes the number correct Binomial(n, correct/n), so drawing
    that count is the bootstrap itself, exact and O(resamples) instead of O(resamples * n).
    """
    accuracies = np.random.default_rng(seed).binomial(n, correct / n, size=resamples) / n
    low, high = np.percentile(accuracies, [2.5, 97.5])
    return [float(low), float(high)]


_SCORES = ("accuracy", "accuracy_ci95", "macro_precision", "macro_recall", "macro_f1", "unparsable_rate",
           "format_rate")


def label_metrics(y_true: list[str], y_pred: list[str], format_ok: list[bool], candidates: list[str],
                  n_errors: int = 0) -> dict:
    """Metrics of one set of predictions over the label list `candidates` (predictions may be "unknown")."""
    n = len(y_true)
    # Rows: true labels. Columns: the candidates, any other predicted label (the paper's synonym table on a
    # custom label set can name one), then "unknown".
    columns = candidates + sorted(set(y_pred) - set(candidates) - {UNKNOWN}) + [UNKNOWN]
    matrix = np.zeros((len(candidates), len(columns)), dtype=np.int64)
    row_of, col_of = {c: i for i, c in enumerate(candidates)}, {c: j for j, c in enumerate(columns)}
    for t, p in zip(y_true, y_pred):
        matrix[row_of[t], col_of[p]] += 1
    out: dict = {"n": n, "n_errors": n_errors,
                 "confusion": {"labels_true": candidates, "labels_pred": columns, "matrix": matrix.tolist()}}
    if n == 0:  # every row of this set failed at inference: nothing to score
        return out | dict.fromkeys(_SCORES) | {"per_class": []}

    correct = sum(t == p for t, p in zip(y_true, y_pred))
    # Macro over the labels of y_true ∪ y_pred (sklearn's default), so a predicted "unknown" is a class with
    # precision 0, exactly like the reference evaluator.
    precision, recall, f1, _ = precision_recall_fscore_support(y_true, y_pred, average="macro", zero_division=0)
    per_p, per_r, per_f, per_n = precision_recall_fscore_support(
        y_true, y_pred, labels=candidates, average=None, zero_division=0)
    return out | {
        "accuracy": correct / n,
        "accuracy_ci95": bootstrap_ci(correct, n),
        "macro_precision": float(precision),
        "macro_recall": float(recall),
        "macro_f1": float(f1),
        "per_class": [
            {"label": c, "precision": float(p), "recall": float(r), "f1": float(f), "support": int(s)}
            for c, p, r, f, s in zip(candidates, per_p, per_r, per_f, per_n)
        ],
        "unparsable_rate": sum(p == UNKNOWN for p in y_pred) / n,
        "format_rate": sum(format_ok) / n,
    }


def _pooled_label(label: str) -> str:
    return label if label == UNKNOWN else canonical(label)


def _in_taxonomy(labels: list[str]) -> bool:
    """Whether every label maps into the canonical taxonomy, so that its dataset can be pooled."""
    try:
        for label in labels:
            _pooled_label(label)
    except ValueError:
        return False
    return True


def dataset_order(names) -> list[str]:
    """FERBench datasets in their usual order, then any others alphabetically."""
    known = [key for key in DATASETS if key in names]
    return known + sorted(set(names) - set(known))


def compute_metrics(rows: list[dict], mode: str) -> dict:
    """Metrics of one model: {dataset: metrics, ..., "overall": metrics}.

    "overall" pools every dataset whose labels belong to the canonical taxonomy, after mapping true and predicted
    labels into it (angry -> anger, happy -> happiness, sad -> sadness; "unknown" stays "unknown"); its
    `datasets` entry lists the datasets pooled.
    """
    if mode not in MODES:
        raise ValueError(f"unknown scoring mode {mode!r}; expected one of {MODES}")
    by_dataset: dict[str, list[dict]] = {}
    for row in rows:
        by_dataset.setdefault(row["dataset"], []).append(row)

    out: dict[str, dict] = {}
    pooled = {"y_true": [], "y_pred": [], "format_ok": [], "n_errors": 0, "labels": set(), "datasets": []}
    for dataset in dataset_order(by_dataset):
        group = by_dataset[dataset]
        candidates = list(dict.fromkeys(c for row in group for c in row["candidate_labels"]))
        scored = [row for row in group if not row.get("error")]
        y_true = [row["true_label"] for row in scored]
        y_pred = [predict(row, mode) for row in scored]
        format_ok = [bool(row["format_ok"]) for row in scored]
        n_errors = len(group) - len(scored)
        out[dataset] = {"mode": mode} | label_metrics(y_true, y_pred, format_ok, candidates, n_errors)
        if _in_taxonomy(candidates + y_pred):
            pooled["y_true"] += [_pooled_label(t) for t in y_true]
            pooled["y_pred"] += [_pooled_label(p) for p in y_pred]
            pooled["format_ok"] += format_ok
            pooled["n_errors"] += n_errors
            pooled["labels"].update(_pooled_label(c) for c in candidates)
            pooled["datasets"].append(dataset)
    labels = [c for c in CANONICAL if c in pooled["labels"]]
    out[OVERALL] = {"mode": mode, "datasets": pooled["datasets"]} | label_metrics(
        pooled["y_true"], pooled["y_pred"], pooled["format_ok"], labels, pooled["n_errors"])
    return out


# ---------------------------------------------------------------- two models on the same items


def mcnemar_exact(corrected: int, broken: int) -> float:
    """McNemar's exact test, two-sided: the p-value of `corrected` against `broken` discordant items if each were as
    likely to go either way (the binomial test of one count in corrected + broken draws at 1/2)."""
    n = corrected + broken
    return float(binomtest(corrected, n, 0.5).pvalue) if n else 1.0


def paired_comparison(before: list[dict], after: list[dict], mode: str = "strict") -> dict:
    """Two models' result rows on the items both answered (failed inferences left out): how many `after` gets right
    that `before` got wrong (corrected), the reverse (broken), and McNemar's exact p-value of those counts."""
    def correct(rows: list[dict]) -> dict[tuple[str, str], bool]:
        return {(row["dataset"], row["id"]): predict(row, mode) == row["true_label"]
                for row in rows if not row.get("error")}

    was, now = correct(before), correct(after)
    shared = was.keys() & now.keys()
    corrected = sum(now[i] and not was[i] for i in shared)
    broken = sum(was[i] and not now[i] for i in shared)
    return {"items": len(shared), "before_correct": sum(was[i] for i in shared),
            "after_correct": sum(now[i] for i in shared), "corrected": corrected, "broken": broken,
            "mcnemar_p": mcnemar_exact(corrected, broken)}
