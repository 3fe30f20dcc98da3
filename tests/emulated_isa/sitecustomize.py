"""`make ISA=avx2 ...`: every Python process of the run sees this x86-64 CPU as AVX2-only (most laptops).

Python imports this module at start-up from PYTHONPATH, so it reaches pytest, Ray's workers and vLLM's engine processes
alike. When torch.cpu loads, its `get_capabilities` loses every AVX-512 and AMX feature; vLLM's CPU build decides by
it which kernels to import (`_C_AVX2`), and `engines/platform.py` which dtype CPU engines run in (float32). Torch's
own kernels (ATen, oneDNN) keep to AVX2 by their variables, set here before torch reads them and inherited by every
process this one starts. What this cannot give is an AVX2 machine's speed: the cores stay what they are.
"""

import functools
import importlib.machinery
import os
import sys
import types

HIDDEN = ("avx512", "amx")
KERNELS_ENV = {"ATEN_CPU_CAPABILITY": "avx2", "ONEDNN_MAX_CPU_ISA": "AVX2"}


class _TorchCpuWithoutAvx512:
    """A meta-path finder that loads torch.cpu as usual, then masks what its `get_capabilities` reports."""

    def find_spec(self, name, path=None, target=None):
        if name != "torch.cpu":
            return None
        spec = importlib.machinery.PathFinder.find_spec(name, path)
        load = spec.loader.exec_module

        def exec_module(module):
            load(module)
            reported = module.get_capabilities

            @functools.cache
            def get_capabilities():
                return types.MappingProxyType({k: False if k.startswith(HIDDEN) else v for k, v in reported().items()})

            module.get_capabilities = get_capabilities  # the module's _is_avx512_supported & co. look it up here

        spec.loader.exec_module = exec_module
        return spec


if os.environ.get("UNIFER_EMULATED_ISA") == "avx2":
    os.environ.update(KERNELS_ENV)
    sys.meta_path.insert(0, _TorchCpuWithoutAvx512())
