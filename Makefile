PYTHON ?= python3
PIP = $(PYTHON) -m pip
DEMO_PACK ?= packs/demo
DEMO_PROMPT ?= "upbeat piano with acoustic bass and rock drums in C major"

.PHONY: install install-demo install-dev demo test bench clean

# torch is pinned first so that pip never resolves a newer (CUDA) build on a CPU machine.
install:
	$(PYTHON) -c "import torch" 2>/dev/null || $(PIP) install -q torch==2.13.0
	$(PIP) install -q setuptools wheel "pybind11>=2.10"
	$(PIP) install -q --no-build-isolation -e .

install-demo: install
	$(PIP) install -q --no-build-isolation -e ".[demo]"

install-dev: install
	$(PIP) install -q --no-build-isolation -e ".[dev]"

demo: install-demo
	mkdir -p demo
	$(PYTHON) -m vivace generate --pack $(DEMO_PACK) $(DEMO_PROMPT) --duration 10 --seed 0 --quantize int8 -o demo/out.wav

test: install-dev
	$(PYTHON) -m pytest tests

clean:
	rm -rf build *.egg-info demo engine/_C*.so
