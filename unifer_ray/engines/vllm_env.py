"""What every process that starts a vLLM engine needs: the same defaults for FERBench, curation, rollouts and Serve.

vLLM's CPU build refuses to start without a KV-cache size, and its automatic thread binding pins every engine of a
node to the same core (it reserves the others), so two engine actors on one node would share one core. The defaults
below give each engine a 1 GiB KV cache and leave thread placement to the OS and to Ray's `OMP_NUM_THREADS`;
variables already set in the environment win. Both variables only concern vLLM's CPU backend: GPU engines ignore them.
"""

from __future__ import annotations

import os

CPU_DEFAULTS = {"VLLM_CPU_KVCACHE_SPACE": "1", "VLLM_CPU_OMP_THREADS_BIND": "nobind"}


def vllm_env() -> dict[str, str]:
    """Environment variables for a process that will start a vLLM engine (for `runtime_env={"env_vars": ...}`)."""
    return {key: os.environ.get(key, default) for key, default in CPU_DEFAULTS.items()}


def apply_vllm_env() -> None:
    """Set the defaults in this process, before vLLM is imported or an engine starts."""
    for key, value in vllm_env().items():
        os.environ.setdefault(key, value)

