"""The pipeline's report: a markdown page, the same facts as JSON, and plots of training and of FERBench."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from unifer_ray.bench.report import accuracy_table
from unifer_ray.runlog import last_per_step, read_run_log

SFT_PLOT = "sft_loss.png"
RLVR_PLOT = "rlvr_rewards.png"
BENCH_PLOT = "ferbench_accuracy.png"
MOVING_WINDOW = 10  # steps in the RLVR curves' moving averages


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


def moving_average(values: list[float], window: int) -> tuple[np.ndarray, np.ndarray]:
    """At each step, the mean of the last `window` steps' values (the finite ones: a task type absent from a step is
    NaN there) and its standard error, their standard deviation over the square root of their count."""
    values = np.asarray(values, dtype=np.float64)
    means, errors = np.full(len(values), np.nan), np.full(len(values), np.nan)
    for i in range(len(values)):
        part = values[max(0, i - window + 1) : i + 1]
        part = part[np.isfinite(part)]
        if len(part):
            means[i] = part.mean()
        if len(part) > 1:
            errors[i] = part.std(ddof=1) / math.sqrt(len(part))
    return means, errors


def first_vs_last_fifth(values: list[float]) -> dict:
    """The mean over the first and over the last fifth of the steps (at least 2 each), each with its standard error
    (each step is a fresh batch of prompts), and the gain in standard errors of the difference."""
    count = max(2, len(values) // 5)
    first = np.asarray(values[:count], dtype=np.float64)
    last = np.asarray(values[-count:], dtype=np.float64)
    first_se, last_se = (float(v.std(ddof=1) / math.sqrt(count)) for v in (first, last))
    spread = math.hypot(first_se, last_se)
    gain = float(last.mean() - first.mean())
    return {"steps_each": count, "first": float(first.mean()), "first_se": first_se, "last": float(last.mean()),
            "last_se": last_se, "gain_in_se": gain / spread if spread > 0 else None}


def task_accuracy(records: list[dict]) -> dict[str, dict]:
    """Per task type (the controller's `accuracy/<task>`), its mean over the first and the last fifth of the steps
    (None where the task was in none of them)."""
    count = max(2, len(records) // 5)
    tasks = sorted({k.removeprefix("accuracy/") for r in records for k in r if k.startswith("accuracy/")})

    def mean(rows: list[dict], task: str) -> float | None:
        found = [r[f"accuracy/{task}"] for r in rows if f"accuracy/{task}" in r]
        return float(np.mean(found)) if found else None

    return {t: {"first": mean(records[:count], t), "last": mean(records[-count:], t)} for t in tasks}


def rlvr_plot(records: list[dict], path: Path) -> None:
    """The rollouts' accuracy reward (each step, its moving average and a band of ±2 standard errors) and format
    reward; the accuracy per task type; KL to the reference (where the loss has it) and the rollout engine's gap to the
    learner; the clipped fractions."""
    steps = np.array([r["step"] for r in records])

    def series(key: str) -> list[float]:
        return [r.get(key, float("nan")) for r in records]

    fig = Figure(figsize=(11, 7))
    (reward, tasks), (kl, clipped) = fig.subplots(2, 2)
    accuracy, error = moving_average(series("accuracy"), MOVING_WINDOW)
    reward.plot(steps, series("accuracy"), ".", alpha=0.35, color="C0", label="accuracy reward (each step)")
    reward.plot(steps, accuracy, color="C0", label=f"accuracy, mean of {MOVING_WINDOW} steps")
    reward.fill_between(steps, accuracy - 2 * error, accuracy + 2 * error, color="C0", alpha=0.2, label="± 2 s.e.")
    reward.plot(steps, moving_average(series("format_rate"), MOVING_WINDOW)[0], color="C1",
                label=f"format reward, mean of {MOVING_WINDOW} steps")
    reward.set_ylim(0, 1.05)
    reward.set_title("RLVR (GRPO) rollout rewards")
    for key in sorted({k for r in records for k in r if k.startswith("accuracy/")}):
        tasks.plot(steps, moving_average(series(key), MOVING_WINDOW)[0], label=key.removeprefix("accuracy/"))
    tasks.set_ylim(0, 1.05)
    tasks.set_title(f"accuracy reward per task type (mean of {MOVING_WINDOW} steps)")
    if any(r.get("kl") for r in records):  # beta 0: no reference model, so no KL to plot
        kl.plot(steps, series("kl"), color="C3", label="policy ‖ reference (the loss's term)")
    kl.plot(steps, series("rollout_mismatch_k3"), color="C4", label="rollout engine ‖ learner (numerics, lag)")
    kl.set_title("KL per token (k3 estimates)")
    clipped.plot(steps, series("clip_fraction"), label="ratio clipped (1 ± ε)")
    clipped.plot(steps, series("rollout_is_clipped_fraction"), label="importance weight at its cap")
    clipped.set_title("clipped fraction of tokens")
    for ax in (reward, tasks, kl, clipped):
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=7)
    _save(fig, path)


def paired_lines(paired: dict) -> list[str]:
    before, after = paired["before"], paired["after"]
    return ["", f"## {after} vs {before} on the same FERBench items", "",
            f"| items | {before} right | {after} right | corrected | broken | McNemar exact p |",
            "|---:|---:|---:|---:|---:|---:|",
            f"| {paired['items']} | {paired['before_correct']} | {paired['after_correct']} | {paired['corrected']} | "
            f"{paired['broken']} | {paired['mcnemar_p']:.2g} |",
            "", f"Corrected: right only with {after}; broken: right only with {before}. McNemar's exact test: how "
                "likely counts this far apart are if each changed answer were as likely to go either way."]


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
                          sft_log: str | None, rlvr_log: str | None, paired: dict | None = None) -> Path:
    """`paired`: the last benchmarked model against the one before it on the same items
    (pipeline.paired_last_two)."""
    report_dir.mkdir(parents=True, exist_ok=True)
    sft = last_per_step(read_run_log(sft_log)) if sft_log else []
    rlvr = last_per_step(read_run_log(rlvr_log)) if rlvr_log else []
    plots = []
    if sft:
        curve_plot(sft, {"loss": "loss (assistant tokens)"}, "SFT", report_dir / SFT_PLOT)
        plots.append(("SFT training loss", SFT_PLOT))
    if rlvr:
        rlvr_plot(rlvr, report_dir / RLVR_PLOT)
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
    if paired:
        summary["paired"] = paired
    if rlvr:
        summary["rlvr"] = {"steps": rlvr[-1]["step"], "kl_last": rlvr[-1].get("kl")}
    if len(rlvr) >= 4:  # two steps in each of the first and last fifths at least
        summary["rlvr"] |= {"reward": first_vs_last_fifth([r["reward/mean"] for r in rlvr]),
                            "accuracy": first_vs_last_fifth([r["accuracy"] for r in rlvr]),
                            "accuracy_by_task": task_accuracy(rlvr)}
    (report_dir / "report.json").write_text(json.dumps(summary, indent=2))

    lines = ["# Pipeline report", "", "| stage | seconds | engine | result |", "|---|---:|---|---|"]
    lines += [f"| {r['stage']} | {r['seconds']:.1f} | {r.get('engine', '')} | {r.get('note', '')} |"
              for r in stage_rows]
    lines.append(f"| **total** | **{summary['seconds_total']:.1f}** | | |")
    if bench_metrics:
        header, rows = accuracy_table(bench_metrics)
        lines += ["", "## FERBench (strict parsing)", "", "| " + " | ".join(header) + " |",
                  "|" + "---|" * len(header)] + ["| " + " | ".join(row) + " |" for row in rows]
    if paired:
        lines += paired_lines(paired)
    if "accuracy" in summary.get("rlvr", {}):
        a = summary["rlvr"]["accuracy"]
        gain = "" if a["gain_in_se"] is None else f" ({a['gain_in_se']:+.1f} standard errors)"
        by_task = ", ".join(f"{t} {_rate(v['first'])} → {_rate(v['last'])}"
                            for t, v in summary["rlvr"]["accuracy_by_task"].items())
        lines += ["", f"RLVR training accuracy reward (± 1 s.e.): {a['first']:.3f} ± {a['first_se']:.3f} over the "
                      f"first {a['steps_each']} steps, {a['last']:.3f} ± {a['last_se']:.3f} over the last "
                      f"{a['steps_each']}{gain}." + (f" Per task type, first → last: {by_task}." if by_task else "")]
    for title, name in plots:
        lines += ["", f"## {title}", "", f"![{title}]({name})"]
    report = report_dir / "report.md"
    report.write_text("\n".join(lines) + "\n")
    return report


def _rate(value: float | None) -> str:
    return "-" if value is None else f"{value:.3f}"
