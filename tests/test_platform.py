"""The machine as the engines see it: the dtype CPU engines run in, and the platform line."""

from __future__ import annotations

import os
import platform
import subprocess
import sys
from pathlib import Path

import pytest

from tests.emulated_isa.sitecustomize import HIDDEN
from tests.helpers import needs_vllm
from unifer_ray.engines import EngineSpec, engine_description
from unifer_ray.engines.platform import cpu_engine_dtype, native_bf16, platform_line, vllm_installed
from unifer_ray.engines.vllm_engine import vllm_llm_kwargs

ROOT = Path(__file__).resolve().parents[1]
# What `make ISA=avx2` puts in the environment of every process it starts (the Makefile).
EMULATED_AVX2 = {"UNIFER_EMULATED_ISA": "avx2", "PYTHONPATH": f"{ROOT / 'tests' / 'emulated_isa'}:{ROOT}"}


def cpu_flags() -> set[str]:
    """The CPU's flags as /proc/cpuinfo has them, less what `make ISA=avx2` hides from torch."""
    hidden = HIDDEN if os.environ.get("UNIFER_EMULATED_ISA") == "avx2" else ()
    for line in open("/proc/cpuinfo"):
        if line.split(":")[0].strip() in ("flags", "Features"):
            return {flag for flag in line.split(":", 1)[1].split() if not flag.startswith(hidden)}
    return set()


def test_native_bf16_is_what_the_cpu_reports():
    flags = cpu_flags()
    if platform.machine() == "x86_64":
        assert native_bf16() == bool(flags & {"avx512_bf16", "amx_bf16"})
    else:
        assert native_bf16() == ("bf16" in flags)
    assert cpu_engine_dtype() == ("bfloat16" if native_bf16() else "float32")


def test_cpu_engines_take_the_cpus_fast_dtype_and_a_written_dtype_wins():
    spec = EngineSpec(engine="vllm", model="m")
    on_cpu, on_gpu = vllm_llm_kwargs(spec, on_cpu=True), vllm_llm_kwargs(spec, on_cpu=False)
    assert on_cpu["dtype"] == cpu_engine_dtype() and on_cpu["enforce_eager"] is True  # a short run: start-up first
    assert on_gpu["dtype"] == "auto" and "enforce_eager" not in on_gpu  # a GPU: vLLM's own choices
    compiled = spec.model_copy(update={"vllm_kwargs": {"enforce_eager": False}})
    assert vllm_llm_kwargs(compiled, on_cpu=True)["enforce_eager"] is False
    for written in ("float32", "bfloat16"):
        assert vllm_llm_kwargs(spec.model_copy(update={"dtype": written}), on_cpu=True)["dtype"] == written
    # The stage table says it.
    if vllm_installed():
        assert engine_description(spec, on_cpu=True).endswith(f" {cpu_engine_dtype()}")
    assert engine_description(spec.model_copy(update={"engine": "hf"}), on_cpu=True) == "hf"


@needs_vllm
def test_serve_replicas_on_cpus_take_the_cpus_fast_dtype(ray_cluster, tiny_model_dir):  # placement reads the nodes
    from unifer_ray.serve.app import llm_config
    from unifer_ray.serve.config import ServeConfig

    def engine_kwargs(llm: dict) -> dict:
        config = ServeConfig.model_validate({"llm_config": {
            "model_loading_config": {"model_id": "m", "model_source": str(tiny_model_dir)}, **llm}})
        return llm_config(config).engine_kwargs

    on_cpu = engine_kwargs({"placement_group_config": {"bundles": [{"CPU": 1}]}})
    assert on_cpu["dtype"] == cpu_engine_dtype() and on_cpu["enforce_eager"] is True
    on_gpu = engine_kwargs({"placement_group_config": {"bundles": [{"CPU": 1, "GPU": 1}]}})
    assert on_gpu["dtype"] == "auto" and "enforce_eager" not in on_gpu
    assert engine_kwargs({"engine_kwargs": {"dtype": "bfloat16"}})["dtype"] == "bfloat16"


def test_the_platform_line_says_isa_vllm_and_dtype():
    line = subprocess.run([sys.executable, "-m", "unifer_ray.engines.platform"], capture_output=True, text=True,
                          check=True).stdout.strip()
    assert line == platform_line()
    import torch

    assert f"ISA {torch.backends.cpu.get_cpu_capability()}" in line
    # Without vLLM the engines are transformers', which run float32 on CPUs whatever the CPU.
    assert line.endswith(f"CPU engine dtype {cpu_engine_dtype() if vllm_installed() else 'float32 (transformers)'}")
    assert ("vLLM 0.29.0 (kernels _C" in line) == vllm_installed()


@pytest.mark.skipif(platform.machine() != "x86_64", reason="AVX2 is an x86-64 ISA")
def test_make_isa_avx2_gives_a_process_the_torch_vllm_and_platform_line_of_an_avx2_only_cpu():
    """`make ISA=avx2` runs the suite or the demo as an AVX2-only x86-64 would: a process started with its environment
    gets a torch without AVX-512 or AMX, vLLM's AVX2 kernels (the library it loads) and that machine's platform line."""
    probe = """
import torch
from unifer_ray.engines.platform import platform_line, vllm_installed
print(torch.cpu._is_avx512_supported(), torch.cpu._is_amx_tile_supported())
if vllm_installed():
    from vllm.platforms import current_platform
    current_platform.import_kernels()
print(sorted({line.split("/")[-1].split(".")[0] for line in open("/proc/self/maps") if "/vllm/_C" in line}))
print(platform_line())
"""
    avx512_amx, kernels, line = subprocess.run([sys.executable, "-c", probe], env=os.environ | EMULATED_AVX2,
                                               capture_output=True, text=True, check=True).stdout.strip().splitlines()
    assert avx512_amx == "False False"
    assert "ISA AVX2 (emulated: make ISA=avx2) (no native bf16)" in line
    if vllm_installed():
        assert kernels == "['_C_AVX2']"
        assert "vLLM 0.29.0 (kernels _C_AVX2)" in line and line.endswith("CPU engine dtype float32")
    else:
        assert kernels == "[]" and line.endswith("CPU engine dtype float32 (transformers)")
