"""What every process that starts a vLLM engine needs: the same defaults for FERBench, curation, rollouts and Serve.

vLLM's CPU build refuses to start without a KV-cache size, and its automatic thread binding pins every engine of a
node to the same core (it reserves the others), so two engine actors on one node would share one core. The defaults
below give each engine a 1 GiB KV cache and leave thread placement to the OS and to Ray's `OMP_NUM_THREADS`. vLLM's
CPU performance guide also has tcmalloc and Intel OpenMP preloaded into the engine's processes: 1.27x items/s here
(benchmarks/bench_cpu_dtype.py), so each is preloaded where it is installed (Debian's libtcmalloc-minimal4, which
`make` installs where it can; the intel-openmp wheel of vLLM's x86-64 requirements), never required. Variables
already set in the environment win. All of them only concern vLLM's CPU backend: GPU engines ignore them.
"""

from __future__ import annotations

import os
import platform
import sys
from collections.abc import Iterator
from contextlib import contextmanager

CPU_DEFAULTS = {"VLLM_CPU_KVCACHE_SPACE": "1", "VLLM_CPU_OMP_THREADS_BIND": "nobind"}
PRELOADS = (f"/usr/lib/{platform.machine()}-linux-gnu/libtcmalloc_minimal.so.4",
            os.path.join(sys.prefix, "lib", "libiomp5.so"))


def preloads() -> str:
    """LD_PRELOAD for engine processes: the libraries of PRELOADS that this machine has."""
    return ":".join(path for path in PRELOADS if os.path.isfile(path))


def vllm_env() -> dict[str, str]:
    """Environment variables for a process that will start a vLLM engine (for `runtime_env={"env_vars": ...}`)."""
    env = {key: os.environ.get(key, default) for key, default in CPU_DEFAULTS.items()}
    if library_paths := os.environ.get("LD_PRELOAD", preloads()):
        env["LD_PRELOAD"] = library_paths
    return env


@contextmanager
def vllm_env_applied() -> Iterator[None]:
    """The defaults in this process while an engine starts in it: vLLM starts its engine processes with this
    process's environment. LD_PRELOAD is this process's own again afterwards (vLLM sets it too), so that other
    programs it starts later do not preload the engine's libraries."""
    preload = os.environ.get("LD_PRELOAD")
    for key, value in vllm_env().items():
        os.environ.setdefault(key, value)
    try:
        yield
    finally:
        if preload is None:
            os.environ.pop("LD_PRELOAD", None)
        else:
            os.environ["LD_PRELOAD"] = preload
