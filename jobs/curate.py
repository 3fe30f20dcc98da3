"""Curation on a Ray cluster:
`ray job submit --runtime-env cluster/runtime_env.yaml -- python jobs/curate.py cot --config configs/qwen2_5_vl_7b.yaml`
(or `rlvr`)."""

from __future__ import annotations

import argparse
import json
import logging

from unifer_ray.curate.run import curate_from_file

if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO)
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("what", choices=["cot", "rlvr"])
    parser.add_argument("--config", required=True)
    parser.add_argument("--section", default=None, help="default: curate_cot / curate_rlvr")
    args = parser.parse_args()
    print(json.dumps(curate_from_file(args.what, args.config, args.section), indent=2))
