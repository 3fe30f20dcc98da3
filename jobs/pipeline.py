"""The whole pipeline on a Ray cluster, one stage after the other (curate CoT → curate RLVR → SFT → RLVR → FERBench
(base vs SFT vs RLVR) → Serve): `unifer pipeline`, the same options, logs and output.

    ray job submit --runtime-env cluster/runtime_env.yaml -- python jobs/pipeline.py --config configs/qwen2_5_vl_7b.yaml
    ray job submit --runtime-env cluster/runtime_env.yaml -- python jobs/pipeline.py --config FILE --stages rlvr bench
"""

import sys

from unifer_ray.cli import main

if __name__ == "__main__":
    main(["pipeline", *sys.argv[1:]])
