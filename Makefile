# Entry points: `make demo` (install, then edit the shipped example), `make serve` (install with the web app, then
# start it on the embedded model) and `make test` (install with the web app, then test).
# `make install` also installs the research package (research/: synthetic world, `dit4edit-bench`).
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
APP_STAMP := $(VENV)/.installed-app
OUT ?= out
TORCH_INDEX ?=

.PHONY: install demo serve test browser bench clean

$(STAMP): pyproject.toml research/pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	# torch pinned. On Linux, PyPI's wheel bundles the CUDA libraries (several GB); on a machine without an NVIDIA GPU
	# pass TORCH_INDEX=<PyTorch's CPU wheel index URL> to get the CPU-only build instead (not tried by default: a
	# machine that cannot reach that index would wait on it)
	$(BIN)/python -m pip install --quiet $(if $(TORCH_INDEX),--index-url $(TORCH_INDEX)) torch==2.13.0
	$(BIN)/python -m pip install --quiet -e ".[test]"
	# the research package (synthetic world, editing benchmark) that the tests and `dit4edit-bench` use
	$(BIN)/python -m pip install --quiet --no-deps -e research
	touch $(STAMP)

$(APP_STAMP): $(STAMP)
	$(BIN)/python -m pip install --quiet -e ".[test,app]"
	touch $(APP_STAMP)

install: $(STAMP)

# One torch thread unless told otherwise: the demo's 128 px edit and the tests gain little from more on a 2-core
# machine (idle: 4.3 vs 4.0 s, 74 vs 75 s), and beside one busy process torch's spinning threads made them 15x and
# 10x slower (73 s, 13 min).
THREADS = OMP_NUM_THREADS=$${OMP_NUM_THREADS:-1}

demo: install
	$(THREADS) $(BIN)/python -m dit4edit.demo $(OUT)

serve: $(APP_STAMP)
	$(BIN)/python -m dit4edit serve

test: $(APP_STAMP) browser
	$(THREADS) $(BIN)/python -m pytest

# The web app's browser test drives Debian's chromium through chromium-driver. Installed here when apt-get can
# (root or password-less sudo); anywhere else that one test is skipped and says why.
browser:
	@if command -v chromium >/dev/null && command -v chromedriver >/dev/null; then exit 0; fi; \
	if ! command -v apt-get >/dev/null; then echo "make: no apt-get: the browser test will be skipped"; exit 0; fi; \
	if [ "$$(id -u)" = 0 ]; then SUDO=; elif sudo -n true 2>/dev/null; then SUDO="sudo -n"; \
	else echo "make: apt-get needs root: the browser test will be skipped"; exit 0; fi; \
	($$SUDO apt-get update -qq && DEBIAN_FRONTEND=noninteractive $$SUDO apt-get install -y -qq chromium chromium-driver \
	  >/dev/null) || echo "make: installing chromium failed: the browser test will be skipped"

clean:
	rm -rf $(VENV) $(OUT) .pytest_cache
