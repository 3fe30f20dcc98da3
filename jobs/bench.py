"""FERBench on a Ray cluster: `unifer bench run`, the same options, logs and output.

    ray job submit --runtime-env cluster/runtime_env.yaml -- python jobs/bench.py --config configs/ferbench.yaml
"""

import sys

from unifer_ray.cli import main

if __name__ == "__main__":
    main(["bench", "run", *sys.argv[1:]])
