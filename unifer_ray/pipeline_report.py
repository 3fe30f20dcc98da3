"""The pipeline's report: a markdown page, the same facts as JSON, and plots of training and of FERBench."""

from __future__ import annotations

import json
from pathlib import Path

from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from unifer_ray.bench.report import accuracy_table
from unifer_ray.runlog import read_run_log

SFT_PLOT = "sft_loss.png"
RLVR_PLOT = "rlvr_rewards.png"
BENCH_PLOT = "ferbench_accuracy.png"


def last_per_step(records: list[dict]) -> list[dict]:
    """A resumed run logs the steps after its last checkpoint again; the last record of each step counts."""
    by_step = {r["step"]: r for r in records}
    return [by_step[s] for s in sorted(by_step)]


def _save(fig: Figure, path: Path) -> None:
    FigureCanvasAgg(fig)  # Agg renders without a display and without pyplot's global state
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def curve_plot(records: list[dict], keys: dict[str, str], title: str, path: Path) -> None:
    fig = Figure(figsize=(6.4, 3.6))
    ax = fig.add_subplot()
    steps = [r["step"] for r in records]
    for key, label in keys.items():
        ax.plot(steps, [r.get(key, float("nan")) for r in records], label=label)
    ax.set_xlabel("step")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend()
    _save(fig, path)


def accuracy_plot(metrics: dict, path: Path) -> None:
    """Grouped bars: strict accuracy per dataset (and overall), one bar per model."""
    models = list(metrics)
    datasets = [d for d in metrics[models[0]] if d != "overall"] + ["overall"]
    fig = Figure(figsize=(7.2, 3.8))
    ax = fig.add_subplot()
    width = 0.8 / len(models)
    for i, model in enumerate(models):
        values = [metrics[model].get(d, {}).get("accuracy", float("nan")) for d in datasets]
        ax.bar([x + i * width for x in range(len(datasets))], values, width, label=model)
    ax.set_xticks([x + width * (len(models) - 1) / 2 for x in range(len(datasets))], datasets)
    ax.set_ylim(0, 1)
    ax.set_ylabel("strict accuracy")
    ax.set_title("FERBench (synthetic test sets)" if "tiny" in " ".join(models) else "FERBench")
    ax.grid(axis="y", alpha=0.3)
    ax.legend()
    _save(fig, path)


def write_pipeline_report(report_dir: Path, stage_rows: list[dict], bench_metrics: dict | None, *,
                          sft_log: str | None, rlvr_log: str | None) -> Path:
    report_dir.mkdir(parents=True, exist_ok=True)
    sft = last_per_step(read_run_log(sft_log)) if sft_log else []
    rlvr = last_per_step(read_run_log(rlvr_log)) if rlvr_log else []
    plots = []
    if sft:
        curve_plot(sft, {"loss": "loss (assistant tokens)"}, "SFT", report_dir / SFT_PLOT)
        plots.append(("SFT training loss", SFT_PLOT))
    if rlvr:
        curve_plot(rlvr, {"reward/mean": "reward (sum)", "accuracy": "accuracy reward", "format_rate": "format reward"},
                   "RLVR (GRPO) rollouts", report_dir / RLVR_PLOT)
        plots.append(("RLVR rewards of the rollouts", RLVR_PLOT))
    if bench_metrics:
        accuracy_plot(bench_metrics, report_dir / BENCH_PLOT)
        plots.append(("FERBench strict accuracy", BENCH_PLOT))

    summary = {"stages": stage_rows, "seconds_total": round(sum(r["seconds"] for r in stage_rows), 1)}
    if bench_metrics:
        summary["ferbench"] = {model: {d: {k: m[k] for k in ("accuracy", "accuracy_ci95", "format_rate") if k in m}
                                       for d, m in per_dataset.items()} for model, per_dataset in bench_metrics.items()}
    if sft:
        summary["sft"] = {"steps": sft[-1]["step"], "first_loss": sft[0]["loss"], "last_loss": sft[-1]["loss"]}
    if rlvr:
        fifth = max(1, len(rlvr) // 5)
        mean = lambda rows: sum(r["reward/mean"] for r in rows) / len(rows)  # noqa: E731
        summary["rlvr"] = {"steps": rlvr[-1]["step"], "reward_first_20pct": mean(rlvr[:fifth]),
                           "reward_last_20pct": mean(rlvr[-fifth:])}
    (report_dir / "report.json").write_text(json.dumps(summary, indent=2))

    lines = ["# Pipeline report", "", "| stage | seconds | engine | result |", "|---|---:|---|---|"]
    lines += [f"| {r['stage']} | {r['seconds']:.1f} | {r.get('engine', '')} | {r.get('note', '')} |"
              for r in stage_rows]
    lines.append(f"| **total** | **{summary['seconds_total']:.1f}** | | |")
    if bench_metrics:
        header, rows = accuracy_table(bench_metrics)
        lines += ["", "## FERBench (strict parsing)", "", "| " + " | ".join(header) + " |",
                  "|" + "---|" * len(header)] + ["| " + " | ".join(row) + " |" for row in rows]
    if "rlvr" in summary:
        r = summary["rlvr"]
        lines += ["", f"RLVR mean reward: {r['reward_first_20pct']:.3f} over the first 20% of steps, "
                      f"{r['reward_last_20pct']:.3f} over the last 20%."]
    for title, name in plots:
        lines += ["", f"## {title}", "", f"![{title}]({name})"]
    report = report_dir / "report.md"
    report.write_text("\n".join(lines) + "\n")
    return report
