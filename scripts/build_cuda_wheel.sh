#!/usr/bin/env bash
# Build the real CUDA extension ptune_fast._C into a wheel with a CUDA build of torch + nvcc, then
# check that wheel in a clean place -- no GPU needed:
#   * `import ptune_fast._C` works (from the installed wheel, not the source tree);
#   * _C.built_archs() is TORCH_CUDA_ARCH_LIST, _C.cuda_runtime_version() is torch's CUDA;
#   * every ptune_fast_C:: op the C++ side registers exists under torch.ops, has a CUDA kernel and a
#     fake (Meta / FakeTensor) implementation, which runs under FakeTensorMode (CUDA fake tensors)
#     and passes torch.library.opcheck's schema / fake-tensor checks on meta tensors;
#   * cuobjdump lists one ELF per requested arch (sm_80, sm_90 by default) in the .so.
#
#   bash scripts/build_cuda_wheel.sh [PYTHON]         # PYTHON: a venv with a CUDA torch
#       default $PTUNE_FAST_CUDA_PYTHON, else /work/venv_cuda/bin/python
#   bash scripts/build_cuda_wheel.sh [PYTHON] --check WHEEL   # only check an existing wheel
#
# Env: OUT_DIR (where the wheel goes; default dist/cuda), SRC_REV (build `git archive SRC_REV`,
# e.g. HEAD, instead of the working tree's tracked + untracked-not-ignored files),
# TORCH_CUDA_ARCH_LIST (default "8.0;9.0"), MAX_JOBS (default: cores), CUDA_HOME (default: the
# toolkit of the nvcc on PATH), CUOBJDUMP, SUMMARY_MD (also write the summary there, markdown).
# The build runs in a temporary copy, so the repository gets no build/ or egg-info.
#
# Setting up such a venv (torch's CUDA major.minor must match nvcc's; torch's cpp_extension
# refuses a different major):
#   python3.11 -m venv /work/venv_cuda && /work/venv_cuda/bin/pip install torch==2.14.1 ninja
#
# Last stdout lines: `build_cuda_wheel: key=value` facts, then `build_cuda_wheel: OK`.
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
PY="${PTUNE_FAST_CUDA_PYTHON:-/work/venv_cuda/bin/python}"
check_only=""
while [ $# -gt 0 ]; do
  case "$1" in
    --check) check_only="$2"; shift 2 ;;
    -h|--help) sed -n '2,25p' "${BASH_SOURCE[0]}"; exit 0 ;;
    -*) echo "build_cuda_wheel: unknown option $1" >&2; exit 2 ;;
    *) PY="$1"; shift ;;
  esac
done
say() { echo "build_cuda_wheel: $*"; }
die() { echo "build_cuda_wheel: ERROR: $*" >&2; exit 1; }

[ -x "$PY" ] || command -v "$PY" >/dev/null 2>&1 || die "python $PY not found"
torch_info="$("$PY" -c 'import torch; print(torch.__version__, torch.version.cuda)' 2>/dev/null)" \
  || die "$PY cannot import torch"
read -r torch_version torch_cuda <<<"$torch_info"
[ "$torch_cuda" != "None" ] || die "$PY has a CPU-only torch ($torch_version); a CUDA build is needed"

export TORCH_CUDA_ARCH_LIST="${TORCH_CUDA_ARCH_LIST:-8.0;9.0}"
# sm_XY per entry ("8.0" -> 80, "9.0+PTX" -> 90): the ELFs cuobjdump must list.
want_sms="$(tr ';, ' '\n\n\n' <<<"$TORCH_CUDA_ARCH_LIST" | sed -e 's/+[Pp][Tt][Xx]//' -e 's/\.//' | grep -v '^$' | sort -u | tr '\n' ' ')"

NVCC_BIN="$(command -v "${NVCC:-nvcc}" || true)"
if [ -z "${CUDA_HOME:-}" ]; then
  # /usr/local/bin/nvcc may be a wrapper (torch would then guess CUDA_HOME=/usr/local): ask nvcc.
  if [ -n "$NVCC_BIN" ]; then
    real="$(sed -n 's|^exec \(/[^ ]*/bin/nvcc\) .*|\1|p' "$NVCC_BIN" 2>/dev/null | head -1)"
    real="$(readlink -f "${real:-$NVCC_BIN}")"
    CUDA_HOME="$(dirname "$(dirname "$real")")"
  fi
  [ -n "${CUDA_HOME:-}" ] && [ -f "$CUDA_HOME/include/cuda_runtime.h" ] || CUDA_HOME=/usr/local/cuda
fi
export CUDA_HOME
work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT

if [ -z "$check_only" ]; then
  [ -x "$CUDA_HOME/bin/nvcc" ] || die "no nvcc under CUDA_HOME=$CUDA_HOME"
  nvcc_version="$("$CUDA_HOME/bin/nvcc" --version | sed -n 's/.*release \([0-9.]*\),.*/\1/p')"
  out_dir="${OUT_DIR:-$here/dist/cuda}"
  mkdir -p "$out_dir"
  out_dir="$(cd "$out_dir" && pwd)"
  src="$work/src"
  mkdir -p "$src"
  if [ -n "${SRC_REV:-}" ]; then
    git -C "$here" archive "$SRC_REV" | tar -x -C "$src"
    src_desc="git archive $SRC_REV ($(git -C "$here" rev-parse --short "$SRC_REV"))"
  else
    (cd "$here" && git ls-files -co --exclude-standard -z | tar --null -T - --ignore-failed-read -cf - 2>/dev/null) \
      | tar -x -C "$src"
    src_desc="working tree at $(git -C "$here" rev-parse --short HEAD)$(git -C "$here" diff --quiet HEAD || echo ' + uncommitted edits')"
  fi
  rm -f "$out_dir"/ptune_fast-*.whl
  say "building from $src_desc with $PY (torch $torch_version, CUDA $torch_cuda), nvcc $nvcc_version, CUDA_HOME=$CUDA_HOME, TORCH_CUDA_ARCH_LIST=$TORCH_CUDA_ARCH_LIST"
  load_before="$(cut -d' ' -f1 /proc/loadavg 2>/dev/null || echo ?)"
  timer=()   # CPU time of the build too, where GNU time exists
  [ -x /usr/bin/time ] && timer=(/usr/bin/time -f "%U %S" -o "$work/cpu_time")
  t0=$(date +%s.%N)
  # PTUNE_FAST_BUILD_CUDA=1: fail instead of silently building a pure-Python wheel.
  if ! PTUNE_FAST_BUILD_CUDA=1 MAX_JOBS="${MAX_JOBS:-$(nproc 2>/dev/null || echo 2)}" \
      "${timer[@]}" "$PY" -m pip wheel --no-build-isolation --no-deps -v -w "$out_dir" "$src" >"$work/build.log" 2>&1; then
    tail -80 "$work/build.log" >&2
    die "pip wheel failed (log above)"
  fi
  t1=$(date +%s.%N)
  build_seconds="$(awk "BEGIN{printf \"%.0f\", $t1 - $t0}")"
  cpu_seconds="$([ -f "$work/cpu_time" ] && awk '{printf "%.0f", $1 + $2}' "$work/cpu_time" || echo ?)"
  load_after="$(cut -d' ' -f1 /proc/loadavg 2>/dev/null || echo ?)"
  cp "$work/build.log" "$out_dir/build.log"
  wheel="$(ls "$out_dir"/ptune_fast-*.whl | head -1)"
else
  wheel="$check_only"
  [ -f "$wheel" ] || die "no wheel $wheel"
  build_seconds=""
  nvcc_version=""
fi
wheel="$(cd "$(dirname "$wheel")" && pwd)/$(basename "$wheel")"
wheel_bytes="$(stat -c %s "$wheel")"

# ------------------------------------------------------------------ check, in a clean place
site="$work/site"
"$PY" -m pip install -q --no-deps --no-compile --target "$site" "$wheel" >"$work/install.log" 2>&1 \
  || { cat "$work/install.log" >&2; die "pip install --target failed"; }
so="$(ls "$site"/ptune_fast/_C*.so 2>/dev/null | head -1)"
[ -n "$so" ] || die "the wheel has no ptune_fast/_C*.so (pure-Python build?)"
so_bytes="$(stat -c %s "$so")"
# what the .so is made of: device code (.nv_fatbin) and host debug info (python's CFLAGS carry -g)
read -r fatbin_bytes debug_bytes < <(size -A "$so" 2>/dev/null \
  | awk '$1 == ".nv_fatbin" {f += $2} $1 ~ /^\.debug/ {d += $2} END {print f + 0, d + 0}')

CUOBJDUMP="${CUOBJDUMP:-$(command -v cuobjdump || true)}"
for cand in "$CUDA_HOME/bin/cuobjdump" \
    "$("$PY" -c 'import os, triton; print(os.path.join(os.path.dirname(triton.__file__), "backends/nvidia/bin/cuobjdump"))' 2>/dev/null)"; do
  [ -n "$CUOBJDUMP" ] && break
  [ -x "$cand" ] && CUOBJDUMP="$cand"   # the toolkit's, else the one triton ships
done
[ -n "$CUOBJDUMP" ] || die "cuobjdump not found (set CUOBJDUMP)"
elfs="$("$CUOBJDUMP" --list-elf "$so" | sed -n 's/.*\.\(sm_[0-9a-z]*\)\.cubin.*/\1/p' | sort | uniq -c | awk '{print $2 "x" $1}' | tr '\n' ' ')"
ptx="$("$CUOBJDUMP" --list-ptx "$so" 2>/dev/null | sed -n 's/.*\.\(sm_[0-9a-z]*\)\.ptx.*/\1/p' | sort -u | tr '\n' ' ')"
for sm in $want_sms; do
  grep -q "sm_${sm}x" <<<"$elfs" || die "cuobjdump --list-elf shows no sm_$sm ELF in $so (got: $elfs)"
done

cat >"$work/check.py" <<'PYEOF'
"""Load the installed wheel's ptune_fast._C and check what it registers (no GPU needed)."""
import importlib
import os
import pkgutil
import re
import sys
import warnings

warnings.filterwarnings("ignore")
site, want_archs, src_bindings = sys.argv[1], sys.argv[2], sys.argv[3]
import torch

import ptune_fast
import ptune_fast._C as C

assert os.path.realpath(C.__file__).startswith(os.path.realpath(site)), C.__file__
print("check: gpu_visible=%s" % torch.cuda.is_available())
archs = list(C.built_archs())
assert archs == [a for a in re.split(r"[;, ]+", want_archs) if a], (archs, want_archs)
assert C.arch_list == want_archs, C.arch_list
cudart = C.cuda_runtime_version()
major, minor = (int(x) for x in torch.version.cuda.split(".")[:2])
assert cudart // 1000 == major and (cudart % 1000) // 10 == minor, (cudart, torch.version.cuda)
print("check: built_archs=%s cuda_runtime_version=%d" % (";".join(archs), cudart))

# the Python fake implementations: every ptune_fast.ops module's _load_ops()
for info in pkgutil.iter_modules(importlib.import_module("ptune_fast.ops").__path__, "ptune_fast.ops."):
    mod = importlib.import_module(info.name)
    if hasattr(mod, "_load_ops"):
        assert mod._load_ops(), info.name + "._load_ops() failed"

ops = sorted(n for n in torch._C._dispatch_get_all_op_names() if n.startswith("ptune_fast_C::"))
if src_bindings != "-":  # the dispatcher's ops are exactly bindings.cpp's m.def()s
    text = open(src_bindings).read()
    # schema defs: m.def("name(...) -> ...") with only string literals (pybind's m.def has more)
    defs = {"ptune_fast_C::" + re.match(r'\s*"(\w+)\(', d).group(1)
            for d in re.findall(r'm\.def\(\s*((?:"[^"]*"\s*)+)\)', text)}
    assert set(ops) == defs, (ops, sorted(defs))
assert ops, "no ptune_fast_C ops registered"
from torch._library.simple_registry import singleton

for qual in ops:
    name = qual.split("::")[1]
    packet = getattr(torch.ops.ptune_fast_C, name)
    assert torch._C._dispatch_has_kernel_for_dispatch_key(qual, "CUDA"), qual + ": no CUDA kernel"
    assert singleton.find(qual).fake_impl.kernel is not None, qual + ": no fake impl (register_fake)"
    assert torch._C._dispatch_has_kernel_for_dispatch_key(qual, "Meta"), qual + ": no Meta kernel"
    # CUDA only: CPU tensors are refused (NotImplementedError), never silently computed
    assert not torch._C._dispatch_has_kernel_for_dispatch_key(qual, "CPU"), qual + ": has a CPU kernel"
    print("check: op %s  schema: %s" % (qual, packet.default._schema))


def samples(dev):
    h, f, b = torch.float16, torch.float32, torch.bfloat16
    q = torch.empty(2, 3, 8, 64, dtype=h, device=dev).transpose(1, 2)
    k = torch.empty(2, 2, 30, 64, dtype=h, device=dev)
    pk = torch.empty(3, 2, 7, 64, dtype=h, device=dev)
    ids = torch.zeros(2, dtype=torch.int64, device=dev)
    mask = torch.ones(2, 30, dtype=torch.bool, device=dev)
    x = torch.empty(20, 64, dtype=f, device=dev)
    ws = [torch.empty(128, 64, dtype=f, device=dev), torch.empty(32, 128, dtype=f, device=dev)]
    bs = [torch.empty(0, dtype=f, device=dev), torch.empty(32, dtype=f, device=dev)]
    return {
        "decode_attention": ((q, k, k, pk, pk, ids, mask, True, 0.125, 0), (2, 8, 3, 64), h),
        "encoder_mlp_fwd": ((x, torch.arange(5, device=dev), ws, bs, 1, b), (5, 32), b),
    }


from torch._subclasses.fake_tensor import FakeTensorMode

with FakeTensorMode():
    cases = samples("cuda")
    for qual in ops:
        name = qual.split("::")[1]
        assert name in cases, f"{qual}: add sample inputs for it to scripts/build_cuda_wheel.sh"
        args, shape, dtype = cases[name]
        out = getattr(torch.ops.ptune_fast_C, name)(*args)
        assert tuple(out.shape) == shape and out.dtype == dtype and out.device.type == "cuda", (name, out)
    # and the Python launch paths (what ptune_fast calls) trace through the fakes
    da = importlib.import_module("ptune_fast.ops.decode_attention")
    pe = importlib.import_module("ptune_fast.ops.prompt_encoder")
    args = cases["decode_attention"][0]
    assert da.run(*args[:7], True, None, 0.0).shape == (2, 8, 3, 64)
    x, idx, ws, _, _, _ = cases["encoder_mlp_fwd"][0]
    assert pe._fused_forward(x, ws, [None, None], "relu", torch.bfloat16, idx).shape == (5, 32)
print("check: FakeTensorMode (cuda fake tensors): %d op(s) + launch paths ok" % len(ops))

# opcheck on meta tensors: schema (no undeclared mutation / aliasing) + fake vs meta kernel
cases = samples("meta")
for qual in ops:
    name = qual.split("::")[1]
    res = torch.library.opcheck(getattr(torch.ops.ptune_fast_C, name).default, cases[name][0],
                                test_utils=("test_schema", "test_faketensor"))
    assert all(v == "SUCCESS" for v in res.values()), (qual, res)
print("check: opcheck(test_schema, test_faketensor) on meta tensors: %d op(s) ok" % len(ops))
print("CHECK-OK")
PYEOF

bindings="$here/csrc/bindings.cpp"   # --check: the wheel is taken to come from this tree
[ -z "$check_only" ] && bindings="$src/csrc/bindings.cpp"
(cd "$work" && PYTHONPATH="$site" PYTHONNOUSERSITE=1 "$PY" check.py "$site" "$TORCH_CUDA_ARCH_LIST" "$bindings") \
  >"$work/check.log" 2>&1 || { cat "$work/check.log" >&2; die "wheel check failed"; }
grep '^check:' "$work/check.log" | sed 's/^/build_cuda_wheel: /'

say "wheel=$wheel"
say "wheel_bytes=$wheel_bytes"
say "so_bytes=$so_bytes"
say "so_fatbin_bytes=$fatbin_bytes"
say "so_debug_bytes=$debug_bytes"
[ -n "$build_seconds" ] && say "build_seconds=$build_seconds" && say "build_cpu_seconds=$cpu_seconds"
say "torch=$torch_version torch_cuda=$torch_cuda nvcc=${nvcc_version:-?}"
say "arch_list=$TORCH_CUDA_ARCH_LIST"
say "elf=$elfs"
say "ptx=${ptx:-none}"
if [ -n "${SUMMARY_MD:-}" ]; then
  {
    echo "# CUDA wheel build: ptune_fast._C ($(date -u +%Y-%m-%d))"
    echo
    echo "Produced by \`scripts/build_cuda_wheel.sh\` on $(uname -m), $(nproc) CPU cores, no GPU."
    echo
    echo "| | |"
    echo "|---|---|"
    echo "| date (UTC) | $(date -u '+%Y-%m-%d %H:%M') |"
    [ -n "${src_desc:-}" ] && echo "| source | $src_desc |"
    echo "| python | $("$PY" -c 'import platform; print(platform.python_version())') |"
    echo "| torch | $torch_version (torch.version.cuda = $torch_cuda) |"
    echo "| nvcc | ${nvcc_version:-?} (CUDA_HOME=$CUDA_HOME) |"
    echo "| g++ | $(g++ -dumpfullversion 2>/dev/null || echo ?) |"
    echo "| command | \`TORCH_CUDA_ARCH_LIST=\"$TORCH_CUDA_ARCH_LIST\" PTUNE_FAST_BUILD_CUDA=1 MAX_JOBS=${MAX_JOBS:-$(nproc)} python -m pip wheel --no-build-isolation --no-deps -w OUT_DIR SRC\` |"
    echo "| wheel | $(basename "$wheel") |"
    echo "| wheel size | $wheel_bytes bytes ($(awk "BEGIN{printf \"%.2f\", $wheel_bytes / 1048576}") MiB); _C .so $so_bytes bytes ($(awk "BEGIN{printf \"%.2f\", $so_bytes / 1048576}") MiB: .nv_fatbin $fatbin_bytes, host .debug_* $debug_bytes) |"
    [ -n "$build_seconds" ] && echo "| build wall time | $build_seconds s (CPU user+sys $cpu_seconds s; 1-min load average $load_before before, $load_after after) |"
    echo "| cuobjdump --list-elf | $elfs(arch x number of ELFs) |"
    echo "| cuobjdump --list-ptx | ${ptx:-none} |"
    echo
    echo "Check of the installed wheel (\`pip install --no-deps --target\`, imported from a scratch dir):"
    echo
    echo '```'
    grep '^check:' "$work/check.log"
    echo '```'
  } >"$SUMMARY_MD"
  say "summary=$SUMMARY_MD"
fi
say OK
