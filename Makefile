PYTHON ?= python3
PIP = $(PYTHON) -m pip
DEMO_PACK ?= demo/pack
DEMO_PROMPT ?= "upbeat piano trio with walking bass"

.PHONY: install install-dev demo test bench clean

# torch is pinned first so that pip never resolves a newer (CUDA) build on a CPU machine.
install:
	$(PYTHON) -c "import torch" 2>/dev/null || $(PIP) install -q torch==2.13.0
	$(PIP) install -q setuptools wheel "pybind11>=2.10"
	$(PIP) install -q --no-build-isolation -e .

install-dev: install
	$(PIP) install -q --no-build-isolation -e ".[dev]"

demo: install
	test -f $(DEMO_PACK)/pack.json || $(PYTHON) -m vivace random-pack $(DEMO_PACK) --preset tiny
	$(PYTHON) -m vivace generate --pack $(DEMO_PACK) $(DEMO_PROMPT) --duration 10 --seed 0 -o demo/out.wav

test: install-dev
	$(PYTHON) -m pytest tests

clean:
	rm -rf build *.egg-info demo engine/_C*.so
