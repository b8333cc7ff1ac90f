"""Every repository path and every vivace module (or module attribute) that README.md and docs/ name exists."""
from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
TOP = ("engine", "kernels", "export", "csrc", "tests", "benchmarks", "docs", "recipes", "packs", ".ci")
PATH = re.compile(rf"(?<![\w./-])((?:{'|'.join(re.escape(t) for t in TOP)}|vivace)/[\w./*-]*\w)")
MODULE = re.compile(r"(?<![\w./-])vivace(?:\.\w+)+")
# where the installed package's names live in the repository
PACKAGE_FOLDERS = {"vivace/kernels": "kernels", "vivace/export": "export", "vivace": "engine"}
BUILD_ONLY = {"vivace/__init__.py"}  # written by setup.py's build_py into the build, never in the tree
EXAMPLE_PACKS = re.compile(r"packs/(?!demo\b)")  # packs/<name> in commands: where a user writes a pack


def repository_path(text: str) -> Path:
    for prefix, folder in PACKAGE_FOLDERS.items():
        if text == prefix or text.startswith(prefix + "/"):
            return ROOT / folder / text[len(prefix) + 1 :]
    return ROOT / text


def module_file(parts: list[str]) -> Path | None:
    if parts == ["vivace"]:
        return ROOT / "engine" / "api.py"  # the package's public names (its generated __init__ re-exports them)
    for prefix, folder in PACKAGE_FOLDERS.items():
        head = prefix.split("/")
        if parts[: len(head)] == head:
            base = ROOT / folder / Path(*parts[len(head) :]) if parts[len(head) :] else ROOT / folder
            for candidate in (base.with_suffix(".py"), base / "__init__.py", base):
                if candidate.exists():
                    return candidate
            return None
    return None


def defines(file: Path, name: str) -> bool:
    if file.is_dir():
        return (file / f"{name}.py").exists() or (file / name).is_dir()
    text = file.read_text()
    return re.search(rf"^\s*(?:def|class)\s+{name}\b|^\s*{name}\s*[:=]|^\s+def\s+{name}\b|import .*\b{name}\b", text, re.M) is not None


def resolves(dotted: str) -> bool:
    """vivace.a.b[.attr[.attr]]: the longest prefix that is a module, and each rest name defined in it."""
    parts = dotted.split(".")
    if parts[:2] == ["vivace", "_C"]:
        return True  # the C++ extension: csrc/, checked by its own tests
    for cut in range(len(parts), 0, -1):
        file = module_file(parts[:cut])
        if file is not None:
            rest = parts[cut:]
            return all(defines(file, name) for name in rest[:1]) and len(rest) <= 2
    return False


def test_named_paths_exist() -> None:
    missing = []
    for doc in DOCS:
        for match in PATH.finditer(doc.read_text()):
            text = match.group(1).rstrip(".")
            if text in BUILD_ONLY or "*" in text or EXAMPLE_PACKS.match(text):
                continue
            if not repository_path(text).exists():
                missing.append(f"{doc.name}: {text}")
    assert not missing, "named but not on disk: " + ", ".join(missing)


def test_named_modules_exist() -> None:
    missing = []
    for doc in DOCS:
        for match in MODULE.finditer(doc.read_text()):
            dotted = match.group(0).rstrip(".")
            if not resolves(dotted):
                missing.append(f"{doc.name}: {dotted}")
    assert not missing, "named but not in the package: " + ", ".join(missing)


def test_the_check_sees_a_wrong_name() -> None:
    assert resolves("vivace.core.engine_core.EngineCore") and resolves("vivace.kernels.dispatch")
    assert not resolves("vivace.engine_core") and not resolves("vivace.core.engine_core.NoSuchThing")
    assert not repository_path("engine/no_such_module.py").exists()
