# Two entry points: `make demo` (install, then edit the shipped example) and `make test` (install, then test).
# `make install` also installs the research package (research/: synthetic world, `dit4edit-bench`).
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
OUT ?= out

.PHONY: install demo test bench clean

$(STAMP): pyproject.toml research/pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	# torch pinned explicitly: an open range can pull a multi-GB CUDA build on a CPU-only machine
	$(BIN)/python -m pip install --quiet torch==2.13.0
	$(BIN)/python -m pip install --quiet -e ".[test]"
	# the research package (synthetic world, editing benchmark) that the tests and `dit4edit-bench` use
	$(BIN)/python -m pip install --quiet --no-deps -e research
	touch $(STAMP)

install: $(STAMP)

demo: install
	$(BIN)/python -m dit4edit.demo $(OUT)

test: install
	$(BIN)/python -m pytest

clean:
	rm -rf $(VENV) $(OUT) .pytest_cache
