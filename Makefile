# The two commands of the README: `make demo` and `make test`. Each installs what it needs first.
PYTHON ?= python
TORCH_VERSION ?= 2.13.0

.PHONY: install install-package demo test bench build-demo-model

# torch first: with torch already present, the package's `torch>=2.4` installs nothing more.
install-package:
	$(PYTHON) -c "import torch" 2>/dev/null || $(PYTHON) -m pip install torch==$(TORCH_VERSION)
	$(PYTHON) -m pip install -e .

# the test suite's extras too (pytest, ruff, peft, megatron-core)
install: install-package
	$(PYTHON) -m pip install -e ".[test]"

# the demo needs the package alone
demo: install-package
	$(PYTHON) -m moe_peft_ds train --model tiny-mixtral --method sieve --sieve-fraction 0.25 \
		--data demo:arithmetic --output-dir out/sieve-demo --overwrite

test: install
	$(PYTHON) -m ruff check .
	$(PYTHON) -m ruff format --check .
	$(PYTHON) -m pytest -q tests

bench: install
	$(PYTHON) benchmarks/step_time.py

build-demo-model: install
	$(PYTHON) -m moe_peft_ds build-demo-model
