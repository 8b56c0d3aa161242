"""Build csrc/ for the CPU (tests/cuda_host/cuda_host.h) and call the kernels with ctypes.

``build(overrides)`` compiles the runtime (libcuda_host.so, plain C++), each kernel file with the
race checker's instrumentation and the C ABI shim, and links them into ``libptf_kernels.so``.
Objects are cached in ``$TMPDIR/ptune_fast_cuda_host`` keyed on the hash of their inputs, so a
test session compiles once and a mutant recompiles only the file it changes. ``Kernels`` wraps
the library: ``decode_attention`` / ``encoder_mlp`` take torch CPU tensors, go through the same
Python preparation as the CUDA backend (ptune_fast.ops.*) and the same struct-filling code as
csrc/bindings.cpp, and raise :class:`KernelError` with the checker's report when a launch fails.
"""
from __future__ import annotations

import ctypes
import hashlib
import importlib
import math
import os
import platform
import re
import shutil
import subprocess
import tempfile
import threading
from concurrent.futures import ThreadPoolExecutor

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(os.path.dirname(HERE))
CSRC = os.path.join(ROOT, "csrc")
CXX = os.environ.get("CXX", "g++")
CACHE = os.path.join(tempfile.gettempdir(), "ptune_fast_cuda_host")
KERNEL_FILES = ("decode_attention.cu", "prompt_encoder.cu")
# -O1: the whole build is ~5 s of CPU (-O2 is slower to compile and not faster to run under
# the checker, which sees every shared-memory access anyway).
OPT = os.environ.get("PTF_HOST_OPT", "-O1")
COMMON = ["-std=c++17", "-fPIC", "-Wall", "-Wno-unknown-pragmas", "-I" + HERE]
KERNEL_FLAGS = COMMON + [OPT, "-x", "c++", "-DPTF_HOST_EMULATION", "-fno-strict-aliasing",
                         "-fsanitize=kernel-address", "--param=asan-instrumentation-with-call-threshold=0",
                         "--param=asan-stack=0", "--param=asan-globals=0"]
HOST_FLAGS = COMMON + ["-O2"]

DTYPES = {torch.float16: 0, torch.bfloat16: 1, torch.float32: 2}


def why_unavailable() -> str:
    if shutil.which(CXX) is None:
        return f"{CXX} not found"
    if platform.system() != "Linux" or platform.machine() not in ("x86_64", "AMD64"):
        return "the fiber switch of tests/cuda_host is x86-64 Linux only"
    return ""


class BuildError(RuntimeError):
    pass


class KernelError(RuntimeError):
    """A launch failed: the checker's report (racecheck / synccheck / initcheck) or a CUDA error."""


def _digest(*parts) -> str:
    h = hashlib.sha256()
    for p in parts:
        h.update(p.encode() if isinstance(p, str) else p)
        h.update(b"\0")
    return h.hexdigest()[:16]


def _read(path):
    with open(path) as f:
        return f.read()


def _run(cmd):
    res = subprocess.run(cmd, capture_output=True, text=True)
    if res.returncode != 0:
        raise BuildError(" ".join(cmd) + "\n" + res.stdout + res.stderr)


def _cached(path, make):
    """``make(tmp)`` writes the file; it is renamed to ``path`` (atomic, safe between processes)."""
    if not os.path.exists(path):
        os.makedirs(os.path.dirname(path), exist_ok=True)
        tmp = f"{path}.{os.getpid()}.{threading.get_ident()}.tmp"
        make(tmp)
        os.replace(tmp, path)
    return path


def build(overrides: dict | None = None) -> tuple[str, str]:
    """Returns ``(kernel library, runtime library)`` built from csrc/ with the files named in
    ``overrides`` ({file name: text}, e.g. a mutant) replaced."""
    files = {n: _read(os.path.join(CSRC, n)) for n in sorted(os.listdir(CSRC)) if n.endswith((".cu", ".cuh", ".h"))}
    files.update(overrides or {})
    host = {n: _read(os.path.join(HERE, n)) for n in sorted(os.listdir(HERE)) if n.endswith((".h", ".cpp", ".cu"))}
    host_headers = [host[n] for n in sorted(host) if n.endswith(".h")]
    headers = [files[n] for n in sorted(files) if not n.endswith(".cu")] + host_headers
    src_dir = os.path.join(CACHE, "src", _digest(*(f"{k}\0{v}" for k, v in sorted(files.items()))))
    for name, text in files.items():
        _cached(os.path.join(src_dir, name), lambda tmp, text=text: open(tmp, "w").write(text))

    def compile_to(flags, src, *extra):
        return lambda tmp: _run([CXX, *flags, "-I" + src_dir, *extra, "-c", src, "-o", tmp])

    rt = os.path.join(CACHE, "rt-" + _digest(host["runtime.cpp"], *host_headers, *HOST_FLAGS), "libcuda_host.so")
    jobs = [(rt, lambda tmp: _run([CXX, *HOST_FLAGS, "-shared", os.path.join(HERE, "runtime.cpp"), "-o", tmp,
                                   "-lpthread", "-ldl"]))]
    for name in KERNEL_FILES:
        obj = os.path.join(CACHE, "obj", f"{name}-{_digest(files[name], *headers, *KERNEL_FLAGS)}.o")
        jobs.append((obj, compile_to(KERNEL_FLAGS, os.path.join(src_dir, name))))
    selftest = os.path.join(CACHE, "obj", f"selftest-{_digest(host['selftest.cu'], *headers, *KERNEL_FLAGS)}.o")
    jobs.append((selftest, compile_to(KERNEL_FLAGS, os.path.join(HERE, "selftest.cu"))))
    shim = os.path.join(CACHE, "obj", f"shim-{_digest(host['shim.cpp'], *headers, *HOST_FLAGS)}.o")
    jobs.append((shim, compile_to(HOST_FLAGS, os.path.join(HERE, "shim.cpp"))))
    with ThreadPoolExecutor(max_workers=os.cpu_count() or 2) as ex:
        for f in [ex.submit(_cached, path, make) for path, make in jobs]:
            f.result()
    objs = [path for path, _ in jobs[1:]]
    rt_dir = os.path.dirname(rt)
    lib = os.path.join(CACHE, "lib-" + _digest(*objs, rt), "libptf_kernels.so")
    _cached(lib, lambda tmp: _run([CXX, "-shared", "-o", tmp, *objs, "-L" + rt_dir, "-lcuda_host",
                                   "-Wl,-rpath," + rt_dir, "-Wl,--no-undefined", "-lm"]))
    return lib, rt


class TensorRef(ctypes.Structure):  # csrc/kernels.h
    _fields_ = [("data", ctypes.c_void_p), ("dim", ctypes.c_int), ("elem_bytes", ctypes.c_int),
                ("size", ctypes.c_int64 * 4), ("stride", ctypes.c_int64 * 4)]


def ref(t: torch.Tensor | None) -> TensorRef:
    r = TensorRef()
    if t is not None:
        assert t.device.type == "cpu" and t.dim() <= 4
        r.data, r.dim, r.elem_bytes = t.data_ptr(), t.dim(), t.element_size()
        for i in range(t.dim()):
            r.size[i], r.stride[i] = t.shape[i], t.stride(i)
    return r


class Kernels:
    """csrc/ kernels run on the CPU under the checker (one loaded library)."""

    def __init__(self, lib_path: str, rt_path: str):
        self.path = lib_path
        self.rt = ctypes.CDLL(rt_path)
        self.lib = ctypes.CDLL(lib_path)
        P = ctypes.POINTER(TensorRef)
        self.lib.ptf_decode_attention.argtypes = [P] * 7 + [ctypes.c_int, ctypes.c_float, ctypes.c_int, ctypes.c_int,
                                                            ctypes.c_int, ctypes.c_void_p, ctypes.POINTER(ctypes.c_int)]
        self.lib.ptf_selftest.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_void_p, ctypes.c_void_p]
        self.lib.ptf_encoder_mlp.argtypes = [P, P, P, P, ctypes.c_int, ctypes.c_int, ctypes.c_int, ctypes.c_void_p]
        for f in (self.lib.ptf_round, self.lib.ptf_widen):
            f.argtypes = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int64, ctypes.c_int]
        self.rt.cuda_host_take.restype = ctypes.c_size_t
        self.rt.cuda_host_take.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_size_t]
        self._tls = None
        self.configure()

    def configure(self, num_sms=4, cooperative=True, blocks_per_sm=2, workers=None):
        """The fake device: SM count, cooperative-launch support, occupancy of every kernel
        (blocks per SM), OS threads running the blocks of a normal launch."""
        workers = workers or int(os.environ.get("PTF_HOST_WORKERS", min(2, os.cpu_count() or 1)))
        self.rt.cuda_host_configure(num_sms, int(cooperative), blocks_per_sm, workers)

    def _take(self, which: int) -> str:
        n = self.rt.cuda_host_take(which, None, 0)
        buf = ctypes.create_string_buffer(n + 1)
        self.rt.cuda_host_take(which, buf, n + 1)
        return buf.value.decode()

    def launch_log(self) -> list[str]:
        """One line per launch since the last call: kernel, grid, block."""
        return self._take(1).splitlines()

    def _call(self, what: str, fn, *args):
        """One entry point of the library, from a clean error state (nothing left pending by an
        earlier call, e.g. a failed launch whose status a launcher returned without reading it)."""
        self.rt.cuda_host_reset_error()
        self._check(fn(*args), what)

    def _check(self, rc: int, what: str):
        if rc != 0:
            raise KernelError(f"{what}: cudaError {rc}: {self._symbolize(self._take(0))}")

    def _symbolize(self, msg: str) -> str:
        """``shared+0x1a4`` -> ``shared+0x1a4 (p_s+0x24 in decode_split_kernel<...>)`` from the
        library's TLS symbols (the __shared__ arrays: their value is the offset in the segment)."""
        if self._tls is None:
            try:
                out = subprocess.run(["readelf", "-sW", self.path], capture_output=True, text=True).stdout
                syms = [(int(f[1], 16), int(f[2]), f[7]) for f in (line.split() for line in out.splitlines())
                        if len(f) >= 8 and f[3] == "TLS"]
                names = subprocess.run(["c++filt"], input="\n".join(s[2] for s in syms), capture_output=True,
                                       text=True).stdout.splitlines()
                self._tls = [(v, sz, n) for (v, sz, _), n in zip(syms, names)]
            except OSError:
                self._tls = []

        def name(m):
            off = int(m.group(1), 16)
            for v, sz, n in self._tls:
                if v <= off < v + sz:
                    return f"{m.group(0)} [{n}+{off - v}]"
            return m.group(0)

        return re.sub(r"shared\+0x([0-9a-f]+)", name, msg)

    # -------------------------------------------------------------- the kernels
    def decode_attention(self, q, k, v, prefix_k=None, prefix_v=None, task_ids=None, key_padding_mask=None,
                         causal=True, scale=None, num_splits=0, num_sms=132):
        """What ptune_fast.ops.decode_attention.run + csrc/bindings.cpp do, on CPU tensors.
        Returns ``(out, plan)`` with plan = (q_groups, num_splits, tiles_per_split)."""
        da = importlib.import_module("ptune_fast.ops.decode_attention")
        D = q.shape[-1]
        scale = 1.0 / math.sqrt(D) if scale is None else float(scale)
        if prefix_k is None or prefix_k.shape[-2] == 0:
            pk = pv = tids = None
        else:
            pk, pv = da._vec_ready(prefix_k), da._vec_ready(prefix_v)
            tids = task_ids.contiguous() if prefix_k.dim() == 4 else None
        args = [q, da._vec_ready(k), da._vec_ready(v), pk, pv, tids, da._mask_ready(key_padding_mask)]
        out = torch.empty(q.shape, dtype=q.dtype)
        plan = (ctypes.c_int * 3)(0, 0, 0)
        refs = [ref(t) for t in args]
        self._call("decode_attention", self.lib.ptf_decode_attention, *[ctypes.byref(r) for r in refs], int(causal),
                   scale, DTYPES[q.dtype], int(num_splits), int(num_sms), out.data_ptr(), plan)
        return out, tuple(plan)

    def encoder_mlp(self, x, weights, biases, activation, out_dtype=torch.float32, indices=None):
        """What ptune_fast.ops.prompt_encoder._fused_forward + csrc/bindings.cpp do, on CPU tensors."""
        pe = importlib.import_module("ptune_fast.ops.prompt_encoder")
        ws = [pe._contiguous_aligned(w) for w in weights]
        bs = [None if b is None or b.numel() == 0 else pe._contiguous_aligned(b) for b in biases]
        x = pe._rows_ready(x)
        idx = None if indices is None else indices.contiguous()
        n = x.shape[0] if idx is None else idx.shape[0]
        out = torch.empty(n, ws[-1].shape[0], dtype=out_dtype)
        w_refs = (TensorRef * 4)(*[ref(w) for w in ws])
        b_refs = (TensorRef * 4)(*[ref(b) for b in bs])
        self._call("encoder_mlp", self.lib.ptf_encoder_mlp, ctypes.byref(ref(x)), ctypes.byref(ref(idx)), w_refs,
                   b_refs, len(ws), pe.ACTIVATIONS[activation], DTYPES[out_dtype], out.data_ptr())
        return out

    def selftest(self, kernel: int, which: int, out: torch.Tensor, scratch: torch.Tensor):
        """tests/cuda_host/selftest.cu: the emulator's own checks."""
        self._call("selftest", self.lib.ptf_selftest, kernel, which, out.data_ptr(), scratch.data_ptr())

    def round_to(self, x: torch.Tensor, dtype) -> torch.Tensor:
        """The emulator's float -> fp16/bf16 conversion (bit patterns as int16)."""
        x = x.float().contiguous()
        out = torch.empty(x.shape, dtype=torch.int16)
        self.lib.ptf_round(x.data_ptr(), out.data_ptr(), x.numel(), int(dtype == torch.bfloat16))
        return out.view(dtype)
