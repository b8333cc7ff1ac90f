PYTHON ?= python3
PIP = $(PYTHON) -m pip -q
DEMO_PACK ?= packs/demo
DEMO_PROMPT ?= "upbeat piano with acoustic bass and rock drums in C major"
# One thread: 1.21x and 1.26x faster than two for the int8 demo in both runs of 2026-12-05 (README, "Demo pack").
DEMO_THREADS ?= 1
# make test / make demo install the exact versions CI last passed with; make test-latest the newest releases, and
# make test-oldest setup.py's lower bounds (see the README's "Dependencies").
CONSTRAINTS ?= constraints.txt
PINNED = $(if $(CONSTRAINTS),-c $(CONSTRAINTS))
KEPT_TORCH = build/kept-torch.txt

.PHONY: build-deps install install-demo install-dev demo test test-latest test-oldest constraints clean

# torch comes first, so that pip never resolves a newer (CUDA) build on a CPU machine; an installed torch is kept.
build-deps:
	$(PYTHON) -c "import torch" 2>/dev/null || $(PIP) install torch==2.13.0
	$(PIP) install $(PINNED) setuptools wheel "pybind11>=2.10"

install: build-deps
	$(PIP) install $(PINNED) --no-build-isolation -e .

install-demo: build-deps
	$(PIP) install $(PINNED) --no-build-isolation -e ".[demo]"

# The browser test (tests/test_server_page.py) drives Debian's chromium; without apt-get it fails, naming what is missing.
install-dev: build-deps
	$(PIP) install $(PINNED) --no-build-isolation -e ".[dev]"
	@test -x /usr/bin/chromium && test -x /usr/bin/chromedriver || ! command -v apt-get >/dev/null || \
		(apt-get update -q && DEBIAN_FRONTEND=noninteractive apt-get install -y -q chromium chromium-driver)

demo: install-demo
	mkdir -p demo
	$(PYTHON) -m vivace generate --pack $(DEMO_PACK) $(DEMO_PROMPT) --duration 10 --seed 0 --quantize int8 --threads $(DEMO_THREADS) -o demo/out.wav

test: install-dev
	$(PYTHON) -m pytest tests

# The newest release of every dependency but torch (kept as installed): a break from a new upstream release fails
# here, by name, before it reaches CI. After it passes, `make constraints` moves CI to those versions.
test-latest:
	$(PYTHON) -c "import torch" 2>/dev/null || $(PIP) install torch==2.13.0
	mkdir -p build && $(PYTHON) -c "import torch; print('torch==' + torch.__version__)" > $(KEPT_TORCH)
	$(PIP) install --upgrade -c $(KEPT_TORCH) setuptools wheel pybind11
	$(PIP) install --upgrade --upgrade-strategy eager -c $(KEPT_TORCH) --no-build-isolation -e ".[dev,demo]"
	$(PYTHON) -m pytest tests

# setup.py's lower bounds (.ci/oldest.txt), transformers 4.x among them.
test-oldest:
	$(MAKE) test CONSTRAINTS=.ci/oldest.txt

constraints:
	$(PYTHON) .ci/freeze_constraints.py constraints.txt

clean:
	rm -rf build *.egg-info demo engine/_C*.so
