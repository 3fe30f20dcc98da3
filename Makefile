# Two entry points: `make demo` and `make test`. Both build their own virtual environment first.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
# The CPU pair that installs from this machine's disk; GPU machines install the CUDA build vLLM pins instead.
TORCH := torch==2.14.1 torchvision==0.29.1

.PHONY: demo test bench clean

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet $(TORCH)
	$(PY) -m pip install --quiet -e '.[dev]'
	touch $@

demo: $(VENV)/.installed
	$(VENV)/bin/unifer demo --out runs/demo

test: $(VENV)/.installed
	$(PY) -m pytest tests -v

bench: $(VENV)/.installed
	$(PY) benchmarks/bench_throughput.py

clean:
	rm -rf $(VENV) runs
