"""RLVR step time on the tiny config (vLLM rollouts, as configured there): the weight sync's share of a step, and
`one_step_off` vs `sync` steps/s; also the rollout/learner log-probability mismatch the IS correction sees; and, where
the config has no KL term, what its absence saves: `one_step_off` again with `--kl-beta` (0.04, the paper's) as the
baseline, where the learners also run the reference model and train on the completions of advantage 0.

The runs use the same config (the `rlvr:` section of configs/tiny.yaml by default), model, data, batch and seeds;
only `mode` (or beta) differs. The first step of each run (actor warm-up) is left out of the timings. Figures come
from the runs' own metrics.jsonl (time/step_s, time/sync_s).

By default the policy is a fresh random-init tiny model on a small synthetic set: every completion runs to
max_new_tokens, so generation outweighs training, and every reward is 0, so the policy never moves (its rollout/learner
mismatch is numerics alone). `--from-demo DIR` starts from a demo's SFT model and RLVR set instead (`unifer demo --out
DIR` first), the balance of the real RLVR stage, with a policy that learns:

    python benchmarks/bench_rlvr.py --from-demo runs/demo

One learner by default: on a cluster the rollout engines and the learners have GPUs of their own, and one_step_off's
gain is their overlap. Here the one vLLM engine (1 OMP thread) and one learner (1 thread) model that on 2 cores;
`--learners 0` keeps the config's count (the demo's 2), where overlapping makes three busy threads share two cores.
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")

import numpy as np

from unifer_ray.config import ConfigError, parse_config, read_yaml
from unifer_ray.data.synthetic import write_synthetic_datasets
from unifer_ray.labels import DATASETS
from unifer_ray.models.tiny import build_tiny_model
from unifer_ray.prompts import ferbench_prompt
from unifer_ray.ray_runtime import init_ray
from unifer_ray.rl.config import RLVRConfig
from unifer_ray.rl.controller import run_rlvr
from unifer_ray.runlog import read_run_log

REPO = Path(__file__).resolve().parent.parent


def write_rlvr_items(data_root: Path, path: Path) -> None:
    """The released RLVR format for the synthetic train images: the FERBench question, the label as solution."""
    with open(path, "w") as f:
        for spec in DATASETS.values():
            for line in (data_root / spec.name / "synthetic_actions.jsonl").read_text().splitlines():
                record = json.loads(line)
                if record["split"] == "train":
                    f.write(json.dumps({"image_path": f"/{spec.name}/{record['rel_path']}",
                                        "problem": ferbench_prompt(spec.labels),
                                        "solution": f"<answer>{record['label']}</answer>"}) + "\n")


def run(section: dict, tmp: Path, mode: str, steps: int, name: str = "") -> list[dict]:
    out = tmp / (name or mode)
    config = parse_config(section | {"mode": mode, "steps": steps, "output_dir": str(out / "model"),
                                     "checkpoint_dir": str(out / "checkpoints"), "log_dir": str(out / "logs"),
                                     "checkpoint_every": steps, "sample_log_every": 0}, RLVRConfig)
    run_rlvr(config)
    return read_run_log(out / "logs")[1:]  # without the warm-up step


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--config", default=str(REPO / "configs" / "tiny.yaml"))
    parser.add_argument("--section", default="rlvr")
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--num-cpus", type=float, default=4)
    parser.add_argument("--from-demo", metavar="DIR", help="the SFT model and RLVR set of `unifer demo --out DIR`")
    parser.add_argument("--learners", type=int, default=1,
                        help="learner actors (1 thread each); the config's own count with 0")
    parser.add_argument("--kl-beta", type=float, default=0.04,
                        help="the baseline's KL weight where the config has none (0: no baseline run)")
    args = parser.parse_args()
    data = read_yaml(args.config)
    if not isinstance(data, dict) or args.section not in data:
        raise ConfigError(f"{args.config}: has no '{args.section}' section")
    section = data[args.section]

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        if args.from_demo:
            demo = Path(args.from_demo)
            model_dir, items = demo / "models" / "tiny-sft", demo / "curate" / "rlvr" / "items"
            data_root = demo / "data"
        else:
            data_root, items = tmp / "data", tmp / "rlvr.jsonl"
            write_synthetic_datasets(data_root, train_per_class=4, test_per_class=1, seed=0)
            write_rlvr_items(data_root, items)
            model_dir = build_tiny_model(tmp / "tiny", seed=0)
        if args.learners:
            section = section | {"learner": section.get("learner", {}) | {"num_workers": args.learners}}
        section = section | {"model": str(model_dir),
                             "data": section.get("data", {}) | {"paths": [str(items)], "image_root": str(data_root)}}
        init_ray(num_cpus=args.num_cpus)
        sync = run(section, tmp, "sync", args.steps)
        overlap = run(section, tmp, "one_step_off", args.steps)
        with_kl = None
        if parse_config(section, RLVRConfig).grpo.beta == 0 and args.kl_beta:
            grpo = section.get("grpo", {}) | {"beta": args.kl_beta}
            with_kl = run(section | {"grpo": grpo}, tmp, "one_step_off", args.steps, name="with_kl")

    def mean(records: list[dict], key: str) -> float:
        return float(np.mean([r[key] for r in records]))

    policy = f"the SFT model of {args.from_demo}" if args.from_demo else "a random-init tiny model"
    print(f"\nRLVR on the tiny config ({args.config} [{args.section}]) from {policy}, {args.steps - 1} timed steps "
          "per mode")
    for mode, records in (("sync", sync), ("one_step_off", overlap)):
        print(f"{mode:>12}: step {mean(records, 'time/step_s'):.3f}s; generate {mean(records, 'time/generate_s'):.3f}s"
              f" (waited {mean(records, 'time/generate_wait_s'):.3f}s), logprob {mean(records, 'time/logprob_s'):.3f}s,"
              f" train {mean(records, 'time/train_s'):.3f}s, sync {mean(records, 'time/sync_s'):.4f}s")
    sync_share = mean(sync, "time/sync_s") / mean(sync, "time/step_s")
    print(f"weight sync: {1000 * mean(sync, 'time/sync_s'):.1f} ms per step = {100 * sync_share:.2f}% of the step time")
    for mode, records in (("sync", sync), ("one_step_off", overlap)):
        print(f"{mode:>12}: rollout vs learner: mean |Δ log p| {mean(records, 'rollout_logprob_gap'):.2e}, "
              f"k3 {mean(records, 'rollout_mismatch_k3'):.2e}, "
              f"IS-clipped {mean(records, 'rollout_is_clipped_fraction'):.4f}")
    sync_rate = len(sync) / sum(r["time/step_s"] for r in sync)
    overlap_rate = len(overlap) / sum(r["time/step_s"] for r in overlap)
    print(f"steps/s: sync {sync_rate:.3f}, one_step_off {overlap_rate:.3f} -> {overlap_rate / sync_rate:.3f}x "
          f"(version lag at most {max(r['version_lag/max'] for r in overlap)})")
    if with_kl:
        kl_rate = len(with_kl) / sum(r["time/step_s"] for r in with_kl)
        print(f"one_step_off with a KL term (beta {args.kl_beta}): step {mean(with_kl, 'time/step_s'):.3f}s, "
              f"logprob {mean(with_kl, 'time/logprob_s'):.3f}s, train {mean(with_kl, 'time/train_s'):.3f}s on "
              f"{mean(with_kl, 'train_tokens'):.0f} tokens")
        print(f"one_step_off without (beta 0): train {mean(overlap, 'time/train_s'):.3f}s on "
              f"{mean(overlap, 'train_tokens'):.0f} tokens ({mean(overlap, 'groups_all_equal_fraction'):.0%} of the "
              f"groups all-equal) -> {overlap_rate / kl_rate:.3f}x the steps/s with the KL term")


if __name__ == "__main__":
    main()
