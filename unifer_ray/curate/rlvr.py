"""`unifer curate rlvr`: the verifiable-answer RL set, as one streaming Ray Data graph.

    train samples (class-balanced on request) → hash + decode check (bad images → errors)
      → images also in FERBench excluded → tasks → ledger shards

then `items/` in the released RLVR format (`image_path, problem, solution` = `<answer>label</answer>` + `id,
dataset, task`), `errors.jsonl` and `stats.json`. Tasks per image:
- `mc`: multiple choice over the dataset's labels, in their order (the FERBench question);
- `mc_shuffled`: the same labels in a shuffled order;
- `binary`: "is the most prominent expression X?" — yes (X is the label) or no (another label), half each;
- `unified`: multiple choice over the canonical 8-emotion taxonomy, answered with the canonical name.
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections import Counter, defaultdict
from collections.abc import Iterator

import numpy as np

from unifer_ray import storage
from unifer_ray.curate.config import RlvrSetConfig
from unifer_ray.curate.leakage import ferbench_hashes, hash_batch
from unifer_ray.curate.ledger import LEDGER_KEYS, nest, run_ledger
from unifer_ray.curate.oracle import row_rng
from unifer_ray.curate.samples import IMAGES_DIR, all_source_rows
from unifer_ray.labels import CANONICAL, canonical
from unifer_ray.prompts import ferbench_prompt
from unifer_ray.records import object_array

log = logging.getLogger(__name__)

BINARY_TEMPLATE = (
    "As an expert in facial expression recognition, is the most prominent expression in this image {label}? "
    "Provide your detailed reasoning between the <think></think> tags, "
    "and then give your final answer, yes or no, between the <answer></answer> tags."
)


def answer(text: str) -> str:
    return f"<answer>{text}</answer>"


def make_tasks(label: str, candidates: list[str], tasks: list[str], rng: np.random.Generator) -> list[dict]:
    """The verifiable questions of one image: [{"task", "problem", "solution"}], in the order of `tasks`."""
    out = []
    for task in tasks:
        if task == "mc":
            out.append({"task": task, "problem": ferbench_prompt(candidates), "solution": answer(label)})
        elif task == "mc_shuffled":
            order = [candidates[i] for i in rng.permutation(len(candidates))]
            if order == list(candidates):  # a shuffle that changed nothing would repeat `mc`
                order = order[1:] + order[:1]
            out.append({"task": task, "problem": ferbench_prompt(order), "solution": answer(label)})
        elif task == "binary":
            others = [c for c in candidates if c != label]
            asked = label if not others or rng.random() < 0.5 else others[int(rng.integers(len(others)))]
            out.append({"task": task, "problem": BINARY_TEMPLATE.format(label=asked),
                        "solution": answer("yes" if asked == label else "no")})
        elif task == "unified":
            out.append({"task": task, "problem": ferbench_prompt(CANONICAL), "solution": answer(canonical(label))})
        else:
            raise ValueError(f"unknown RLVR task {task!r}")
    return out


def balance(rows: list[dict], *, equalise: bool, max_per_class: int | None, seed: int) -> list[dict]:
    """Per dataset, at most `max_per_class` images of each label, and (with `equalise`) no more than its rarest
    label has; the images kept are a seeded random choice. The order of `rows` is kept."""
    by_class: dict[tuple[str, str], list[dict]] = defaultdict(list)
    for row in rows:
        by_class[(row["dataset"], row["label"])].append(row)
    rarest: dict[str, int] = {}
    for (dataset, _), members in by_class.items():
        rarest[dataset] = min(rarest.get(dataset, len(members)), len(members))
    kept: set[str] = set()
    for (dataset, _), members in by_class.items():
        cap = min(rarest[dataset] if equalise else len(members), max_per_class or len(members))
        chosen = sorted(members, key=lambda r: hashlib.sha256(f"{seed}:{r['id']}".encode()).hexdigest())[:cap]
        kept.update(r["id"] for r in chosen)
    return [row for row in rows if row["id"] in kept]


def tasks_batch(batch: dict[str, np.ndarray], *, tasks: list[str], seed: int, ferbench: frozenset) -> dict:
    """Ray Data batch UDF after hashing: the RLVR ledger rows; images also in FERBench get no items."""
    errors = np.array(batch["error"], dtype=object)
    leaked, items = [], []
    for i in range(len(batch["id"])):
        is_leak = bool(batch["image_sha256"][i]) and batch["image_sha256"][i] in ferbench
        made: list[dict] = []
        if not errors[i] and not is_leak:
            try:
                made = make_tasks(str(batch["label"][i]), [str(c) for c in batch["candidate_labels"][i]], tasks,
                                  row_rng(seed, str(batch["id"][i])))
            except ValueError as exc:  # e.g. a folder dataset's label outside the canonical taxonomy
                errors[i] = f"tasks: {exc}"
        leaked.append(is_leak)
        items.append(json.dumps(made))
    keep = LEDGER_KEYS + ("dataset", "image_path", "label", "image_sha256")
    return {**{k: batch[k] for k in keep}, "leaked": np.array(leaked, dtype=bool),
            "items": object_array(items), "error": errors}


def rlvr_items(row: dict) -> Iterator[dict]:
    for item in json.loads(row["items"]):
        yield {"image_path": row["image_path"], "problem": item["problem"], "solution": item["solution"],
               "id": f"{row['id']}#{item['task']}", "dataset": row["dataset"], "task": item["task"]}


def count_rlvr(batch: dict) -> dict[str, int]:
    counts: Counter = Counter()
    for dataset, label, leaked, items in zip(batch["dataset"], batch["label"], batch["leaked"], batch["items"]):
        counts["images"] += 1
        if leaked:
            counts["excluded_ferbench"] += 1
            continue
        counts[f"by_class.{dataset}.{label}"] += 1
        for item in json.loads(items):
            counts["items"] += 1
            counts[f"by_task.{item['task']}"] += 1
    return dict(counts)


def shown_rlvr(counts: Counter) -> dict[str, int]:
    """Items made so far, and images left out because FERBench has them."""
    return {"items": counts["items"], "excluded_ferbench": counts["excluded_ferbench"]}


def curate_rlvr_set(config: RlvrSetConfig) -> dict:
    """Curate the RLVR set into `config.out_dir`; a rerun resumes. Returns the stats (also in stats.json)."""
    listed, source_errors = all_source_rows(config.sources, image_root=storage.join(config.out_dir, IMAGES_DIR))
    if not listed:
        where = [s.root or s.hf for s in config.sources]
        raise ValueError(f"no samples in the sources {where} (errors: {source_errors[:3]})")
    rows = listed
    if config.balance or config.max_per_class:
        rows = balance(listed, equalise=config.balance, max_per_class=config.max_per_class, seed=config.seed)
    ferbench = {"images": 0, "hashes": [], "errors": []}
    if config.ferbench_files:
        ferbench = ferbench_hashes(config.ferbench_files, config.ferbench_image_root,
                                   storage.join(config.out_dir, "ferbench_hashes.json"))
    else:
        log.warning("no ferbench_files given: the RLVR set is not checked for test leakage")
    known = frozenset(ferbench["hashes"])

    def build(ds):
        ds = ds.map_batches(hash_batch, fn_kwargs={"decode": True}, batch_size=config.hash_batch_size,
                            num_cpus=config.load_num_cpus)
        return ds.map_batches(tasks_batch, fn_kwargs={"tasks": list(config.tasks), "seed": config.seed,
                                                      "ferbench": known},
                              batch_size=config.hash_batch_size, num_cpus=config.load_num_cpus)

    run = run_ledger(rows, config.out_dir, build=build, expand=rlvr_items, count_batch=count_rlvr,
                     progress=("curate rlvr", shown_rlvr), num_cpus=config.load_num_cpus, fmt=config.format,
                     rows_per_shard=config.rows_per_shard,
                     source_errors=source_errors + ferbench["errors"])
    counts = nest(run.counts)
    stats = {
        "pipeline": "rlvr",
        "tasks": list(config.tasks),
        "samples": len(listed),
        "balanced_out": len(listed) - len(rows),
        "images_done": counts.get("images", 0),
        "images_failed": len(run.errors) - len(source_errors) - len(ferbench["errors"]),
        "excluded_ferbench": counts.get("excluded_ferbench", 0),
        "source_errors": len(source_errors),
        "items": counts.get("items", 0),
        "by_task": counts.get("by_task", {}),
        "by_class": counts.get("by_class", {}),
        "ferbench": {"files": list(config.ferbench_files), "images": ferbench["images"],
                     "distinct_hashes": len(known), "unhashable": len(ferbench["errors"])},
        "this_run": {"images": run.processed, "seconds": round(run.seconds, 3),
                     "images_per_s": round(run.processed / run.seconds, 3) if run.seconds else 0.0},
        "items_dir": storage.join(config.out_dir, "items"),
    }
    storage.write_text(storage.join(config.out_dir, "stats.json"), json.dumps(stats, indent=2))
    log.info("RLVR set: %d items from %d images; %d excluded as FERBench images; %d failed images",
             stats["items"], stats["images_done"], stats["excluded_ferbench"], stats["images_failed"])
    return stats
