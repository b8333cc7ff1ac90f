"""The demo recipe's modules for tests: imported the way its scripts import them (from their own folder), then taken
off sys.path and sys.modules again, with every recipe module they pulled in, so that their generic names (common,
evaluate, ...) shadow nothing for other tests."""
from __future__ import annotations

import importlib
import sys
from pathlib import Path
from types import ModuleType

FOLDER = Path(__file__).resolve().parents[1] / "recipes" / "demo_pack"


def import_recipe(*names: str) -> tuple[ModuleType, ...]:
    sys.path.insert(0, str(FOLDER))
    try:
        return tuple(importlib.import_module(name) for name in names)
    finally:
        sys.path.remove(str(FOLDER))
        for name, module in list(sys.modules.items()):
            if Path(getattr(module, "__file__", None) or "/").parent == FOLDER:
                del sys.modules[name]
