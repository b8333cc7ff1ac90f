import os

# Triton kernels are tested on the CPU through its interpreter, which must be chosen before anything
# imports triton (transformers may, during collection). The engine's own CPU path ignores this variable.
# VIVACE_TEST_DEVICE=cuda runs the kernel tests on a GPU instead (tests/kernel_device.py).
if os.environ.get("VIVACE_TEST_DEVICE") != "cuda":
    os.environ.setdefault("TRITON_INTERPRET", "1")

# Measured linear plans (vivace.model.linear_plan) go to a cache of this test run's own, not the user's ~/.cache;
# subprocesses of the tests inherit it.
if "VIVACE_CACHE_DIR" not in os.environ:
    import atexit
    import shutil
    import tempfile

    os.environ["VIVACE_CACHE_DIR"] = tempfile.mkdtemp(prefix="vivace-test-cache-")
    atexit.register(shutil.rmtree, os.environ["VIVACE_CACHE_DIR"], ignore_errors=True)

from pathlib import Path

import pytest
import torch

from vivace import Engine
from vivace.families.musiclm.random_pack import random_pack

# The test models are tiny: one thread is as fast, and a second one stalls badly when the other core is busy.
torch.set_num_threads(1)


@pytest.fixture(scope="session")
def tiny_pack(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return random_pack(tmp_path_factory.mktemp("packs") / "tiny", preset="tiny", seed=0)


@pytest.fixture(scope="session")
def engine(tiny_pack: Path) -> Engine:
    return Engine.from_pack(tiny_pack)


@pytest.fixture
def poisoned_kernel_buffers(monkeypatch: pytest.MonkeyPatch) -> None:
    """Every buffer a Triton wrapper allocates starts as NaN (floats) or -1 (integers): a kernel that skips a write
    cannot pass by reading zeros."""
    from vivace.kernels import buffers

    def poison(shape: tuple[int, ...], dtype: torch.dtype, device: torch.device) -> torch.Tensor:
        return torch.full(shape, float("nan") if dtype.is_floating_point else -1, dtype=dtype, device=device)

    monkeypatch.setattr(buffers, "empty", poison)
