"""The real CUDA extension: scripts/build_cuda_wheel.sh builds the ptune_fast wheel with a CUDA build
of torch + nvcc (``TORCH_CUDA_ARCH_LIST="8.0;9.0" pip wheel --no-build-isolation``), installs it in
a scratch dir and checks it without a GPU: ``ptune_fast._C`` imports, reports its archs, registers
every bindings.cpp op schema with a CUDA kernel and a fake implementation (FakeTensorMode,
opcheck on meta tensors), and the .so holds sm_80 + sm_90 ELFs.

Needs a venv with a CUDA torch -- ``PTUNE_FAST_CUDA_PYTHON``, default /work/venv_cuda/bin/python
(scripts/build_cuda_wheel.sh says how to make one) -- and nvcc on PATH; skips at once otherwise
(CI: CPU torch, no such venv). ~100 s on 2 cores. ``PTUNE_FAST_CUDA_WHEEL=path.whl`` checks that
wheel instead of building one.
"""
import os
import re
import shutil
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(ROOT, "scripts", "build_cuda_wheel.sh")
CUDA_PYTHON = os.environ.get("PTUNE_FAST_CUDA_PYTHON", "/work/venv_cuda/bin/python")
ARCHS = "8.0;9.0"


def _cuda_torch_python():
    """The venv's python when its torch is a CUDA build, else None (only probed when it exists)."""
    if not (os.path.isfile(CUDA_PYTHON) and os.access(CUDA_PYTHON, os.X_OK)):
        return None
    res = subprocess.run([CUDA_PYTHON, "-c", "import torch; print(torch.version.cuda)"],
                         capture_output=True, text=True, timeout=300)
    if res.returncode != 0 or res.stdout.strip().splitlines()[-1:] in ([], ["None"]):
        return None
    return CUDA_PYTHON


@pytest.fixture(scope="module")
def wheel_build(tmp_path_factory):
    if shutil.which(os.environ.get("NVCC", "nvcc")) is None:
        pytest.skip("nvcc not on PATH")
    py = _cuda_torch_python()
    if py is None:
        pytest.skip(f"no CUDA-build torch at {CUDA_PYTHON} (set PTUNE_FAST_CUDA_PYTHON)")
    out = tmp_path_factory.mktemp("cuda_wheel")
    cached = os.environ.get("PTUNE_FAST_CUDA_WHEEL")
    args = ["bash", SCRIPT, py] + (["--check", cached] if cached else [])
    env = dict(os.environ, OUT_DIR=str(out), TORCH_CUDA_ARCH_LIST=ARCHS)
    res = subprocess.run(args, cwd=ROOT, capture_output=True, text=True, timeout=1800, env=env)
    facts = dict(re.findall(r"^build_cuda_wheel: (\w+)=(.*)$", res.stdout, re.M))
    return res, facts


@pytest.mark.slow
def test_cuda_wheel_builds_imports_and_registers(wheel_build):
    res, facts = wheel_build
    assert res.returncode == 0 and res.stdout.rstrip().endswith("build_cuda_wheel: OK"), res.stdout + res.stderr
    wheel = facts["wheel"]
    assert os.path.isfile(wheel) and wheel.endswith(".whl") and "linux_x86_64" in wheel, facts
    assert int(facts["wheel_bytes"]) == os.path.getsize(wheel)
    # _C is tied to the building torch's ABI: the wheel requires that minor release, not the source range
    import zipfile

    with zipfile.ZipFile(wheel) as z:
        meta = z.read(next(n for n in z.namelist() if n.endswith(".dist-info/METADATA"))).decode()
    torch_version = subprocess.run([_cuda_torch_python(), "-c", "import torch; print(torch.__version__)"],
                                   capture_output=True, text=True).stdout.strip()
    minor = ".".join(torch_version.split("+")[0].split(".")[:2])
    assert re.search(r"^Requires-Dist: torch==%s\.\*$" % re.escape(minor), meta, re.M), meta
    assert f"check: built_archs={ARCHS} " in res.stdout, res.stdout
    assert facts["arch_list"] == ARCHS
    elfs = facts["elf"].split()
    assert any(e.startswith("sm_80x") for e in elfs) and any(e.startswith("sm_90x") for e in elfs), elfs
    # every schema bindings.cpp defines came out of the dispatcher, with its fake implementation
    text = open(os.path.join(ROOT, "csrc", "bindings.cpp")).read()
    names = re.findall(r'm\.def\(\s*"(\w+)\(', text)
    assert names
    for name in names:
        assert f"check: op ptune_fast_C::{name}  schema: ptune_fast_C::{name}(" in res.stdout, (name, res.stdout)
    assert "check: FakeTensorMode (cuda fake tensors)" in res.stdout
    assert "check: opcheck(test_schema, test_faketensor) on meta tensors" in res.stdout


@pytest.mark.skipif(sys.platform != "linux", reason="bash script")
def test_build_cuda_wheel_script_is_valid_bash():
    assert subprocess.run(["bash", "-n", SCRIPT]).returncode == 0
    res = subprocess.run(["bash", SCRIPT, "--help"], capture_output=True, text=True)
    assert res.returncode == 0 and "TORCH_CUDA_ARCH_LIST" in res.stdout
