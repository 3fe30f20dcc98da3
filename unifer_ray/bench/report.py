"""FERBench report: result files in, metrics out, with the leaderboard (markdown, terminal text) and a
confusion-matrix PNG per model and dataset."""

from __future__ import annotations

import io
import json
import logging
import re
from collections.abc import Sequence

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from unifer_ray import storage
from unifer_ray.bench.metrics import MODES, OVERALL, ResultRows, compute_metrics, dataset_order, read_results
from unifer_ray.labels import DATASETS
from unifer_ray.records import ErrorRecord, write_jsonl

log = logging.getLogger(__name__)


def _pct(value: float | None) -> str:
    return "–" if value is None else f"{100 * value:.2f}"


def _ci(bounds: list[float] | None) -> str:
    return "–" if bounds is None else f"{100 * bounds[0]:.2f}–{100 * bounds[1]:.2f}"


def _display(dataset: str) -> str:
    if dataset == OVERALL:
        return "Overall"
    return DATASETS[dataset].name if dataset in DATASETS else dataset


def _datasets(metrics: dict) -> list[str]:
    names = {d for per_model in metrics.values() for d in per_model if d != OVERALL}
    return dataset_order(names)


def _models_by_accuracy(metrics: dict) -> list[str]:
    """Best overall accuracy first; models without one last; ties by name."""
    def key(model: str) -> tuple[float, str]:
        accuracy = metrics[model].get(OVERALL, {}).get("accuracy")
        return (-accuracy if accuracy is not None else 1.0, model)
    return sorted(metrics, key=key)


def accuracy_table(metrics: dict) -> tuple[list[str], list[list[str]]]:
    """Models × datasets accuracy (%), then the overall accuracy, its 95% CI and macro-F1 (%)."""
    datasets = _datasets(metrics)
    header = ["Model"] + [_display(d) for d in datasets] + ["Overall", "Overall 95% CI", "Overall macro-F1"]
    rows = []
    for model in _models_by_accuracy(metrics):
        per_model = metrics[model]
        overall = per_model.get(OVERALL, {})
        rows.append([model] + [_pct(per_model.get(d, {}).get("accuracy")) for d in datasets]
                    + [_pct(overall.get("accuracy")), _ci(overall.get("accuracy_ci95")), _pct(overall.get("macro_f1"))])
    return header, rows


def detail_table(metrics: dict) -> tuple[list[str], list[list[str]]]:
    """One line per model and dataset: counts, accuracy with CI, macro P/R/F1, unparsable and format rates (%)."""
    header = ["Model", "Dataset", "n", "Errors", "Accuracy", "95% CI", "Macro-P", "Macro-R", "Macro-F1",
              "Unparsable", "Format OK"]
    rows = []
    for model in _models_by_accuracy(metrics):
        for dataset in _datasets(metrics) + [OVERALL]:
            m = metrics[model].get(dataset)
            if m is None:
                continue
            rows.append([model, _display(dataset), str(m["n"]), str(m["n_errors"]), _pct(m["accuracy"]),
                         _ci(m["accuracy_ci95"]), _pct(m["macro_precision"]), _pct(m["macro_recall"]),
                         _pct(m["macro_f1"]), _pct(m["unparsable_rate"]), _pct(m["format_rate"])])
    return header, rows


def _markdown(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join(["---"] + ["---:"] * (len(header) - 1)) + "|"]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines) + "\n"


def leaderboard_text(metrics: dict) -> str:
    """The accuracy table as aligned plain text, for a terminal."""
    header, rows = accuracy_table(metrics)
    widths = [max(len(line[i]) for line in [header] + rows) for i in range(len(header))]

    def line(cells: list[str]) -> str:  # model names left-aligned, numbers right-aligned
        return "  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(cells, widths)))

    return "\n".join([line(header), "  ".join("-" * w for w in widths)] + [line(row) for row in rows])


def safe_name(name: str) -> str:
    """A file-name-safe version of a model or dataset name ("Qwen/Qwen2.5-VL-7B" -> "Qwen_Qwen2.5-VL-7B")."""
    return re.sub(r"[^A-Za-z0-9._-]+", "_", name).strip("._") or "unnamed"


def confusion_png(m: dict, title: str) -> bytes:
    """A confusion matrix as PNG bytes: counts written in the cells, colour = share of the true class's row."""
    rows, cols = m["confusion"]["labels_true"], m["confusion"]["labels_pred"]
    counts = np.array(m["confusion"]["matrix"], dtype=np.int64).reshape(len(rows), len(cols))
    shares = counts / np.maximum(counts.sum(axis=1, keepdims=True), 1)  # rare classes stay visible

    fig = Figure(figsize=(2.0 + 0.75 * len(cols), 1.6 + 0.6 * len(rows)))
    FigureCanvasAgg(fig)  # Agg renders without a display and without pyplot's global state
    ax = fig.add_subplot()
    ax.imshow(shares, cmap="Blues", vmin=0.0, vmax=1.0)
    ax.set_xticks(range(len(cols)), cols, rotation=45, ha="right")
    ax.set_yticks(range(len(rows)), rows)
    for i in range(len(rows)):
        for j in range(len(cols)):
            ax.text(j, i, str(counts[i, j]), ha="center", va="center", fontsize=8,
                    color="white" if shares[i, j] > 0.5 else "black")
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    ax.set_title(title, fontsize=9)
    fig.tight_layout()
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=100)
    return buffer.getvalue()


def write_report(metrics: dict, out_dir: str, mode: str) -> None:
    """Write `leaderboard.md` and `confusion_<model>_<dataset>.png` for every model and dataset with results."""
    text = (f"# FERBench leaderboard\n\nAnswer extraction: `{mode}`. Accuracy in %, models sorted by overall "
            f"accuracy; the 95% CI is a percentile bootstrap. Overall pools the datasets after mapping labels "
            f"to one taxonomy (angry→anger, happy→happiness, sad→sadness).\n\n"
            + _markdown(*accuracy_table(metrics))
            + "\n## Per dataset\n\nAll values in % except counts; Errors are failed inferences, not scored.\n\n"
            + _markdown(*detail_table(metrics)))
    storage.write_text(storage.join(str(out_dir), "leaderboard.md"), text)
    for model, per_model in metrics.items():
        for dataset, m in per_model.items():
            if not m["n"]:
                continue
            title = f"{model} — {_display(dataset)} ({mode}): accuracy {_pct(m['accuracy'])}%, n={m['n']}"
            name = f"confusion_{safe_name(model)}_{safe_name(dataset)}.png"
            storage.write_bytes(storage.join(str(out_dir), name), confusion_png(m, title))


# ---------------------------------------------------------------- files in, report out


def _names_per_path(paths: Sequence[str], model_names: Sequence[str] | None) -> list[str | None]:
    if not model_names:
        return [None] * len(paths)
    if len(model_names) == 1:
        return [model_names[0]] * len(paths)
    if len(model_names) != len(paths):
        raise ValueError(f"got {len(model_names)} model names for {len(paths)} result paths; "
                         "give one name for all of them or one per path")
    return list(model_names)


def score_files(paths: Sequence[str], *, mode: str, out_dir: str, model_names: Sequence[str] | None = None) -> dict:
    """Score result files (ours and/or the reference format) of one or more models and write the report.

    `model_names`: one name for every file, or one per path (a directory's files share its name); without it a
    row's `model` column names its model, or, for reference files, the file name (see model_name_from_path).
    Writes `metrics.json` (models -> datasets -> metrics), `errors.jsonl` (malformed rows and failed inferences,
    one record each), `leaderboard.md` and the confusion-matrix PNGs to `out_dir`; returns the metrics.
    """
    if mode not in MODES:
        raise ValueError(f"unknown scoring mode {mode!r}; expected one of {MODES}")
    results = ResultRows()
    for path, name in zip(paths, _names_per_path(paths, model_names)):
        part = read_results(path, model_name=name)
        results.rows += part.rows
        results.errors += part.errors

    by_model: dict[str, list[dict]] = {}
    seen: set[tuple[str, str, str]] = set()
    for row in results.rows:
        key = (row["model"], row["dataset"], row["id"])
        if key in seen:
            reason = f"duplicate result for model {row['model']!r}; the first one is scored"
            results.errors.append(ErrorRecord(row["source"], reason, row=row["row"], id=row["id"]).to_dict())
            continue
        seen.add(key)
        by_model.setdefault(row["model"], []).append(row)
    if not by_model:
        first = results.errors[0]["reason"] if results.errors else "the files hold no rows"
        raise ValueError(f"no scorable result rows in {list(paths)} ({len(results.errors)} bad rows; first: {first})")
    for err in results.errors:
        log.warning("bad result row %s row %s: %s", err["source"], err["row"], err["reason"])

    failed = [ErrorRecord(r["source"], f"inference failed: {r['error']}", row=r["row"], id=r["id"]).to_dict()
              for rows in by_model.values() for r in rows if r["error"]]
    metrics = {model: compute_metrics(rows, mode) for model, rows in sorted(by_model.items())}
    storage.write_text(storage.join(out_dir, "metrics.json"), json.dumps(metrics, indent=2))
    write_jsonl(storage.join(out_dir, "errors.jsonl"), results.errors + failed)
    write_report(metrics, out_dir, mode)
    return metrics
