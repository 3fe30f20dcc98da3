"""`unifer curate cot`: the chain-of-thought SFT set, as one streaming Ray Data graph.

    train samples → decode/resize (bad images → errors) → teacher: k traces per image → filters → ledger

then, from the whole ledger: `items/` in the released CoT format (`image_path, question, response` + `id,
dataset, teacher`), `errors.jsonl` and `stats.json`, where every generated trace is counted once, as kept or
under its rejection reason.
"""

from __future__ import annotations

import json
import logging
from collections import Counter
from collections.abc import Iterator

from unifer_ray import storage
from unifer_ray.curate.config import CotSetConfig, OracleTeacherConfig
from unifer_ray.curate.filters import KEPT, REJECTION_REASONS, filter_batch
from unifer_ray.curate.ledger import nest, run_ledger
from unifer_ray.curate.samples import IMAGES_DIR, all_source_rows
from unifer_ray.curate.teachers import add_teacher, teacher_prompt
from unifer_ray.data.images import load_image_batch
from unifer_ray.prompts import ferbench_prompt

log = logging.getLogger(__name__)


def cot_rows(config: CotSetConfig) -> tuple[list[dict], list[dict]]:
    """Input rows (one per train image, with the question and the teacher's prompt) and the sources' errors."""
    rows, errors = all_source_rows(config.sources, with_action_params=isinstance(config.teacher, OracleTeacherConfig),
                                   image_root=storage.join(config.out_dir, IMAGES_DIR))
    for row in rows:
        hint = row["label"] if config.hint == "label" else None
        row["question"] = ferbench_prompt(row["candidate_labels"])
        row["prompt"] = teacher_prompt(row["candidate_labels"], hint)
        row["teacher"] = config.teacher.name
    return rows, errors


def cot_items(row: dict) -> Iterator[dict]:
    """The kept traces of one ledger row, as CoT items; an item's id is its image's id and candidate index."""
    responses, verdicts = json.loads(row["responses"]), json.loads(row["verdicts"])
    for j, (response, verdict) in enumerate(zip(responses, verdicts)):
        if verdict == KEPT:
            yield {"image_path": row["image_path"], "question": row["question"], "response": response,
                   "id": f"{row['id']}#{j}", "dataset": row["dataset"], "teacher": row["teacher"]}


def count_cot(batch: dict) -> dict[str, int]:
    counts: Counter = Counter()
    for dataset, verdicts in zip(batch["dataset"], batch["verdicts"]):
        verdicts = json.loads(verdicts)
        kept = verdicts.count(KEPT)
        counts["images"] += 1
        counts["images_with_kept"] += kept > 0
        counts["generated"] += len(verdicts)
        counts["kept"] += kept
        counts[f"by_dataset.{dataset}.generated"] += len(verdicts)
        counts[f"by_dataset.{dataset}.kept"] += kept
        for v in verdicts:
            if v != KEPT:
                counts[f"rejected.{v}"] += 1
    return dict(counts)


def shown_cot(counts: Counter) -> dict[str, int]:
    """Traces kept and rejected so far."""
    return {"kept": counts["kept"], "rejected": counts["generated"] - counts["kept"]}


def curate_cot_set(config: CotSetConfig) -> dict:
    """Curate the CoT set into `config.out_dir`; a rerun resumes. Returns the stats (also in stats.json)."""
    rows, source_errors = cot_rows(config)
    if not rows:
        where = [s.root or s.hf for s in config.sources]
        raise ValueError(f"no samples in the sources {where} (errors: {source_errors[:3]})")
    teacher = config.teacher

    def build(ds):
        ds = ds.map_batches(load_image_batch, fn_kwargs={"size": teacher.image_size},
                            batch_size=config.load_batch_size, num_cpus=config.load_num_cpus)
        ds = add_teacher(ds, teacher, config.k, rows=len(rows))  # a rerun's are fewer: engines sized for all
        return ds.map_batches(filter_batch, fn_kwargs={"filters": config.filters.model_dump(), "m": config.m},
                              batch_size=teacher.batch_size, num_cpus=config.load_num_cpus)

    run = run_ledger(rows, config.out_dir, build=build, expand=cot_items, count_batch=count_cot,
                     progress=("curate cot", shown_cot), num_cpus=config.load_num_cpus, fmt=config.format,
                     rows_per_shard=config.rows_per_shard, source_errors=source_errors)
    counts = nest(run.counts)
    rejected = {reason: counts.get("rejected", {}).get(reason, 0) for reason in REJECTION_REASONS}
    generated, kept = counts.get("generated", 0), counts.get("kept", 0)
    failed = len(run.errors) - len(source_errors)
    stats = {
        "pipeline": "cot",
        "teacher": teacher.name,
        "teacher_kind": teacher.kind,
        "hint": config.hint,
        "k": config.k,
        "m": config.m,
        "samples": len(rows),
        "images_done": counts.get("images", 0),
        "images_failed": failed,
        "images_with_kept": counts.get("images_with_kept", 0),
        "source_errors": len(source_errors),
        "generated": generated,
        "kept": kept,
        "rejected": rejected,
        "accounted": generated == kept + sum(rejected.values()),
        "by_dataset": counts.get("by_dataset", {}),
        "this_run": {"images": run.processed, "seconds": round(run.seconds, 3),
                     "images_per_s": round(run.processed / run.seconds, 3) if run.seconds else 0.0},
        "items_dir": storage.join(config.out_dir, "items"),
    }
    storage.write_text(storage.join(config.out_dir, "stats.json"), json.dumps(stats, indent=2))
    log.info("CoT set: %d images, %d generated = %d kept + %s; %d failed images",
             stats["images_done"], generated, kept, rejected, failed)
    return stats
