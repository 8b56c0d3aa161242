"""csrc/: the CUDA sources compile with nvcc alone (scripts/compile_csrc.sh, sm_80 + sm_90),
csrc/bindings.cpp passes a C++ syntax check against the installed torch's headers, the
kernel files stay torch-free, the C++ op schemas match the Python fake implementations, and
setup.py stays pure-Python without a CUDA torch.

The compile tests run wherever nvcc is on PATH (CI has it; ~20 s of CPU for the .cu files,
~25 s for the bindings check) and skip otherwise.
"""
import glob
import inspect
import os
import re
import shutil
import subprocess
import sys

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(ROOT, "scripts", "compile_csrc.sh")
NVCC = shutil.which(os.environ.get("NVCC", "nvcc"))


@pytest.mark.skipif(NVCC is None, reason="nvcc not on PATH")
def test_cuda_sources_compile_with_nvcc():
    res = subprocess.run(["bash", SCRIPT], cwd=ROOT, capture_output=True, text=True, timeout=900)
    assert res.returncode == 0, res.stdout + res.stderr
    for src in glob.glob(os.path.join(ROOT, "csrc", "*.cu")):
        name = os.path.basename(src)
        assert f"ok    {name} sm_80" in res.stdout and f"ok    {name} sm_90" in res.stdout, res.stdout


def _torch_has_extension_headers() -> bool:
    from torch.utils.cpp_extension import include_paths

    return os.path.exists(os.path.join(include_paths()[0], "torch", "extension.h"))


@pytest.mark.skipif(NVCC is None or shutil.which(os.environ.get("CXX", "g++")) is None,
                    reason="needs nvcc (CUDA headers) and a C++ compiler")
@pytest.mark.skipif(not _torch_has_extension_headers(), reason="torch headers not installed")
def test_bindings_compile_against_torch_headers():
    res = subprocess.run(["bash", SCRIPT, "--bindings-only"], cwd=ROOT, capture_output=True, text=True, timeout=900)
    assert res.returncode == 0, res.stdout + res.stderr
    assert "bindings.cpp syntax-checked" in res.stdout


def test_kernel_files_do_not_include_torch():
    files = glob.glob(os.path.join(ROOT, "csrc", "*.cu")) + glob.glob(os.path.join(ROOT, "csrc", "*.cuh")) \
        + glob.glob(os.path.join(ROOT, "csrc", "*.h"))
    assert files
    for path in files:
        text = open(path).read()
        assert not re.search(r"#include\s*[<\"](torch|ATen|c10|pybind11)/", text), path


def _schemas():
    text = open(os.path.join(ROOT, "csrc", "bindings.cpp")).read()
    defs = re.findall(r'm\.def\(\s*((?:"[^"]*"\s*)+)\)', text)
    out = {}
    for d in defs:
        schema = "".join(re.findall(r'"([^"]*)"', d))
        name, args = re.match(r"(\w+)\((.*)\)\s*->", schema).groups()
        out[name] = [a.strip().split(" ")[-1].split("=")[0] for a in args.split(",")]
    return out


def test_op_schemas_match_fake_impls():
    schemas = _schemas()
    assert set(schemas) == {"decode_attention", "encoder_mlp_fwd"}
    from ptune_fast.ops import decode_attention as da
    from ptune_fast.ops import prompt_encoder as pe

    # the fake impls are defined inside _load_ops: compare with the source of those functions
    for mod, op in ((da, "decode_attention"), (pe, "encoder_mlp_fwd")):
        src = inspect.getsource(mod._load_ops.__wrapped__)
        m = re.search(r'register_fake\("ptune_fast_C::%s"\)\s*def \w+\(([^)]*)\)' % op, src)
        assert m, f"no fake impl for {op}"
        params = [p.strip().split("=")[0] for p in m.group(1).split(",")]
        assert params == schemas[op], (op, params, schemas[op])
    # and the Python launchers call the ops with every schema argument
    assert "torch.ops.ptune_fast_C.decode_attention(" in inspect.getsource(da.run)
    assert "torch.ops.ptune_fast_C.encoder_mlp_fwd(" in inspect.getsource(pe._fused_forward)


def _setup_functions():
    src = open(os.path.join(ROOT, "setup.py")).read()
    src = src[: src.index("ext_modules, cmdclass = cuda_extensions()")]
    ns = {"__file__": os.path.join(ROOT, "setup.py"), "__name__": "setup_under_test"}
    exec(compile(src, "setup.py", "exec"), ns)
    return ns


@pytest.mark.skipif(torch.version.cuda is not None, reason="checks the CPU-torch (pure-Python) path")
def test_setup_is_pure_python_without_cuda_torch(monkeypatch):
    ns = _setup_functions()
    monkeypatch.setenv("PTUNE_FAST_BUILD_CUDA", "auto")
    assert ns["cuda_extensions"]() == ([], {})
    monkeypatch.setenv("PTUNE_FAST_BUILD_CUDA", "0")
    assert ns["cuda_extensions"]() == ([], {})
    monkeypatch.setenv("PTUNE_FAST_BUILD_CUDA", "1")
    with pytest.raises(RuntimeError, match="PTUNE_FAST_BUILD_CUDA=1"):
        ns["cuda_extensions"]()


def test_setup_build_info_header(tmp_path, monkeypatch):
    ns = _setup_functions()
    monkeypatch.setitem(ns, "HERE", str(tmp_path))
    gen = ns["_write_build_info"]("8.0;9.0+PTX")
    text = open(os.path.join(gen, "ptune_fast_build_info.h")).read()
    assert '#define PTUNE_FAST_ARCH_LIST "8.0;9.0+PTX"' in text


@pytest.mark.skipif(sys.platform != "linux", reason="bash script")
def test_compile_script_is_valid_bash():
    assert subprocess.run(["bash", "-n", SCRIPT]).returncode == 0
