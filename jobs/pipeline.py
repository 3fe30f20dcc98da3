"""The whole pipeline on a Ray cluster, one stage after the other:
curate CoT → curate RLVR → SFT → RLVR → FERBench (base vs SFT vs RLVR) → Serve.

    ray job submit --runtime-env cluster/runtime_env.yaml -- python jobs/pipeline.py --config configs/qwen2_5_vl_7b.yaml
    ray job submit --runtime-env cluster/runtime_env.yaml -- python jobs/pipeline.py --config FILE --stages rlvr bench
"""

from __future__ import annotations

import argparse
import logging

from unifer_ray.pipeline import STAGES, run_pipeline_file

if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", required=True)
    parser.add_argument("--stages", nargs="+", choices=STAGES, default=None,
                        help="run only these stages (default: the file's pipeline.stages)")
    args = parser.parse_args()
    run_pipeline_file(args.config, stages=args.stages)
