"""The repository's top-level folders never shadow an installed distribution of the same name.

Python started in the repository root (`python -m ...`, `python -c ...`, pytest) puts the root first on sys.path, so a
top-level folder that is a regular package (one with an `__init__.py`) would be imported instead of an installed
distribution with the same top-level name: transformers 5 imports the `kernels` distribution, which the repository's
own kernels/ folder hid. The folders are mapped into `vivace` by setup.py and are not packages on their own.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def _top_level_folders() -> list[str]:
    return sorted(
        path.name for path in ROOT.iterdir()
        if path.is_dir() and not path.name.startswith(".") and path.name.isidentifier()
    )


def _run_in_root(code: str, extra_path: Path | None = None) -> dict:
    """Runs `code` the way `python -m` runs from the repository root; the code prints one JSON object."""
    env = {key: value for key, value in os.environ.items() if key not in ("PYTHONPATH", "PYTHONSAFEPATH")}
    if extra_path is not None:
        env["PYTHONPATH"] = str(extra_path)
    result = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    return json.loads(result.stdout.strip().splitlines()[-1])


def test_the_installed_kernels_distribution_wins_over_the_kernels_folder():
    found = _run_in_root(
        "import json, kernels, vivace.kernels.dispatch as dispatch\n"
        "from transformers import BertModel\n"
        "print(json.dumps({'kernels': kernels.__file__, 'has_cuda_properties': hasattr(kernels, 'CUDAProperties'),\n"
        "                  'vivace_kernels': dispatch.__file__, 'bert': BertModel.__name__}))"
    )
    assert Path(found["kernels"]).resolve().parent.parent != ROOT, found  # the distribution, not ./kernels
    assert "site-packages" in found["kernels"] or "dist-packages" in found["kernels"], found
    assert found["bert"] == "BertModel"
    # vivace.kernels is this repository's kernels/ (editable installs link the files into the build tree)
    assert Path(found["vivace_kernels"]).resolve() == ROOT / "kernels" / "dispatch.py"


def test_no_top_level_folder_shadows_an_installed_module_of_its_name(tmp_path):
    folders = _top_level_folders()
    assert {"engine", "kernels", "export", "csrc", "benchmarks", "tests"} <= set(folders)
    for name in folders:  # an installed distribution of each folder's name, on the path after the root
        (tmp_path / name).mkdir()
        (tmp_path / name / "__init__.py").write_text(f"ORIGIN = 'installed {name}'\n")
    code = (
        "import importlib, json\n"
        f"names = {folders!r}\n"
        "print(json.dumps({name: getattr(importlib.import_module(name), 'ORIGIN', None) for name in names}))"
    )
    found = _run_in_root(code, extra_path=tmp_path)
    assert found == {name: f"installed {name}" for name in folders}


def test_the_package_is_importable_only_as_vivace():
    found = _run_in_root(
        "import json, vivace, vivace.export, vivace.kernels\n"
        "print(json.dumps({'engine': vivace.Engine.__module__, 'api': sorted(vivace.__all__),\n"
        "                  'version': vivace.__version__}))"
    )
    assert found["engine"] == "vivace.engine"
    assert "Engine" in found["api"] and found["version"]
    assert not list(ROOT.glob("*/__init__.py")), "a top-level folder is a package on its own"
