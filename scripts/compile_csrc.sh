#!/usr/bin/env bash
# Compile every csrc/*.cu with nvcc alone (no torch headers) for sm_80 and sm_90 into a temp
# dir, failing on any error or warning-as-error. CI runs it when nvcc is on PATH.
#
#   bash scripts/compile_csrc.sh              # all .cu files, both archs
#   NVCC=/path/to/nvcc ARCHS="80 90" JOBS=2 bash scripts/compile_csrc.sh
#   bash scripts/compile_csrc.sh --bindings       # + g++ -fsyntax-only of csrc/bindings.cpp
#   bash scripts/compile_csrc.sh --bindings-only  #   against the installed torch's headers
#       (PTUNE_FAST_CHECK_BINDINGS=1 = --bindings; ~25 s of CPU: torch/extension.h is big)
#   OBJ_DIR=dir bash scripts/compile_csrc.sh  # keep the objects (<name>.sm_<arch>.o, -fPIC) in dir,
#       e.g. for the test that links them into an extension (tests/test_csrc_build.py: one build)
#
# One nvcc process per (file, arch) pair, JOBS at a time (default: number of cores).
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
NVCC="${NVCC:-nvcc}"
ARCHS="${ARCHS:-80 90}"
JOBS="${JOBS:-$(nproc 2>/dev/null || echo 2)}"
check_bindings="${PTUNE_FAST_CHECK_BINDINGS:-0}"
compile_cu=1
for arg in "$@"; do
  case "$arg" in
    --bindings) check_bindings=1 ;;
    --bindings-only) check_bindings=1; compile_cu=0 ;;
    *) echo "compile_csrc: unknown argument $arg" >&2; exit 2 ;;
  esac
done
command -v "$NVCC" >/dev/null 2>&1 || { echo "compile_csrc: $NVCC not found" >&2; exit 2; }

tmp="$(mktemp -d)"
trap 'rm -rf "$tmp"' EXIT
obj_dir="${OBJ_DIR:-$tmp}"
mkdir -p "$obj_dir"

shopt -s nullglob
sources=("$here"/csrc/*.cu)
if [ ${#sources[@]} -eq 0 ]; then echo "compile_csrc: no csrc/*.cu" >&2; exit 2; fi

if [ "$compile_cu" = "1" ]; then
  start=$(date +%s)
  jobs_list=()
  for src in "${sources[@]}"; do
    for arch in $ARCHS; do jobs_list+=("$src:$arch"); done
  done

  compile_one() {
    local src="${1%:*}" arch="${1##*:}"
    local name; name="$(basename "$src" .cu)"
    local log="$tmp/$name.sm_$arch.log"
    # The -D/--expt flags are those torch's CUDAExtension adds (no implicit half/bf16 conversions).
    if "$NVCC" -std=c++17 -O3 -lineinfo -Werror all-warnings -Xcompiler -Wall \
        -D__CUDA_NO_HALF_OPERATORS__ -D__CUDA_NO_HALF_CONVERSIONS__ -D__CUDA_NO_BFLOAT16_CONVERSIONS__ \
        -D__CUDA_NO_HALF2_OPERATORS__ --expt-relaxed-constexpr -Xcompiler -fPIC \
        -gencode "arch=compute_$arch,code=sm_$arch" -I"$here/csrc" -c "$src" -o "$obj_dir/$name.sm_$arch.o" >"$log" 2>&1; then
      echo "ok    $name.cu sm_$arch"
    else
      echo "FAIL  $name.cu sm_$arch"; cat "$log"; return 1
    fi
  }
  export -f compile_one
  export NVCC here tmp obj_dir

  printf '%s\n' "${jobs_list[@]}" | xargs -P "$JOBS" -I{} bash -c 'compile_one "$@"' _ {}
  echo "compile_csrc: ${#sources[@]} file(s) x archs [$ARCHS] in $(( $(date +%s) - start )) s"
fi

if [ "$check_bindings" = "1" ]; then
  # CPU torch wheels ship c10/cuda headers but not the generated c10/cuda/impl/cuda_cmake_macros.h:
  # stub it (CUDA wheels have it). CUDA runtime headers come from the toolkit next to nvcc.
  PY="${PYTHON:-python}"
  inc="$("$PY" -c "from torch.utils.cpp_extension import include_paths; print(' '.join('-isystem' + p for p in include_paths()))")"
  pyinc="$("$PY" -c "import sysconfig; print(sysconfig.get_paths()['include'])")"
  cuda_inc=""
  for cand in "${CUDA_HOME:-}" "${CUDA_PATH:-}" "$(dirname "$(dirname "$(readlink -f "$(command -v "$NVCC")")")")" \
              "$("$PY" -c "from torch.utils.cpp_extension import CUDA_HOME; print(CUDA_HOME or '')" 2>/dev/null)" \
              /usr/local/cuda; do
    if [ -n "$cand" ] && [ -f "$cand/include/cuda_runtime.h" ]; then cuda_inc="$cand/include"; break; fi
  done
  [ -n "$cuda_inc" ] || { echo "compile_csrc: CUDA headers (cuda_runtime.h) not found; set CUDA_HOME" >&2; exit 2; }
  tinc="$("$PY" -c "from torch.utils.cpp_extension import include_paths; print(include_paths()[0])")"
  mkdir -p "$tmp/stub/c10/cuda/impl"
  if [ ! -f "$tinc/c10/cuda/impl/cuda_cmake_macros.h" ]; then
    printf '#pragma once\n#define C10_CUDA_BUILD_SHARED_LIBS\n' > "$tmp/stub/c10/cuda/impl/cuda_cmake_macros.h"
  fi
  std="$("$PY" -c "import torch; print('c++17' if tuple(map(int, torch.__version__.split('.')[:2])) < (2, 10) else 'c++20')")"
  t0=$(date +%s)
  # shellcheck disable=SC2086
  "${CXX:-g++}" -std="$std" -fsyntax-only -Wall -Wextra -Werror -DTORCH_EXTENSION_NAME=_C \
    -DTORCH_API_INCLUDE_EXTENSION_H $inc -isystem"$tmp/stub" -isystem"$pyinc" -isystem"$cuda_inc" \
    -I"$here/csrc" "$here/csrc/bindings.cpp"
  echo "compile_csrc: csrc/bindings.cpp syntax-checked with ${CXX:-g++} -std=$std in $(( $(date +%s) - t0 )) s"
fi
