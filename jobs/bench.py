"""FERBench on a Ray cluster:
`ray job submit --runtime-env cluster/runtime_env.yaml -- python jobs/bench.py --config configs/ferbench.yaml`."""

from __future__ import annotations

import argparse
import logging

from unifer_ray.bench.config import BenchConfig
from unifer_ray.bench.pipeline import bench_and_score
from unifer_ray.config import load_config
from unifer_ray.ray_utils import init_ray

if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO)
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--config", required=True)
    parser.add_argument("--section", default=None)
    parser.add_argument("--mode", choices=["strict", "paper"], default="strict")
    args = parser.parse_args()
    config = load_config(args.config, BenchConfig, section=args.section)
    init_ray()
    bench_and_score(config, mode=args.mode)
