from pathlib import Path

import pytest

from vivace import Engine
from vivace.testing import random_pack


@pytest.fixture(scope="session")
def tiny_pack(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return random_pack(tmp_path_factory.mktemp("packs") / "tiny", preset="tiny", seed=0)


@pytest.fixture(scope="session")
def engine(tiny_pack: Path) -> Engine:
    return Engine.from_pack(tiny_pack)
