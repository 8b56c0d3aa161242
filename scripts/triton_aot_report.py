#!/usr/bin/env python
"""Ahead-of-time compile the prefix-attention Triton kernels for sm_80 / sm_90 (no GPU needed)
and report registers, spill bytes and shared memory per autotune config.

Every config the autotuner can pick (``_prefix_attention_triton.configs_for``, after the shape
pruning) is compiled by Triton's own pipeline down to ``ptxas``; the ``ptxas -v`` log gives
registers and spill stores/loads, the kernel metadata the shared memory. Inputs are specialised
like the runtime specialises them for aligned tensors (pointers and strides divisible by 16).

    python scripts/triton_aot_report.py                       # full sweep -> benchmarks/results/
    python scripts/triton_aot_report.py --quick --json -      # a small subset, JSON on stdout

Exit status 1 when a config spills or does not fit shared memory (``--check``).
The test ``tests/test_triton_resources.py`` runs a subset of this in CI.
"""
from __future__ import annotations

import argparse
import contextlib
import datetime as _dt
import io
import itertools
import json
import os
import re
import shlex
import sys
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor

os.environ.pop("TRITON_INTERPRET", None)  # real JIT functions, not the interpreter's
os.environ.setdefault("TRITON_CACHE_DIR", tempfile.mkdtemp(prefix="ptune-aot-"))  # cold: ptxas always runs
os.environ["TRITON_DUMP_PTXAS_LOG"] = "1"
os.environ["TRITON_ALWAYS_COMPILE"] = "1"  # a cache hit would skip ptxas, hence its log
os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")  # the runtime default (silences a warning)
sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

import torch  # noqa: E402
import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402

from ptune_fast.ops import _prefix_attention_triton as tri  # noqa: E402

#: max dynamic shared memory per block (opt-in), bytes
SMEM_LIMIT = {80: 166912, 90: 232448}
TARGETS = (80, 90)
KERNELS = dict(tri.KERNELS, pre=tri._bwd_pre, reduce=tri._prefix_grad_reduce)
#: per-kernel constexprs beyond ``kernel_constexprs``: "dkv" and "dkvq" are one JIT function
EXTRA_CONSTS = {"dkv": {"FUSE_DQ": False}, "dkvq": {"FUSE_DQ": True}}
#: ``--candidates``: the search space the spill-free tables of ``configs_for`` were picked from
#: (BLOCK_M, BLOCK_N, num_warps, num_stages): the tiles autotuned before the spill pruning, then
#: 8-warp variants added to find spill-free tiles at D = 128 with dropout.
CANDIDATES = {
    "fwd": [(128, 64, 4, 3), (128, 64, 8, 3), (128, 128, 8, 2), (128, 32, 4, 3), (64, 64, 4, 3), (64, 128, 4, 3),
            (64, 32, 4, 4), (32, 64, 4, 3), (16, 128, 4, 3), (16, 32, 4, 2),
            (128, 32, 8, 3), (64, 64, 8, 3), (128, 64, 8, 2), (64, 128, 8, 2), (64, 64, 4, 2)],
    "dkv": [(64, 128, 8, 2), (32, 128, 8, 2), (64, 64, 4, 3), (32, 64, 4, 3), (16, 64, 4, 3), (16, 128, 4, 2),
            (32, 32, 4, 2), (16, 32, 4, 2),
            (32, 64, 8, 2), (64, 64, 8, 2), (16, 64, 8, 2), (64, 32, 8, 2), (32, 128, 8, 1), (16, 128, 8, 2)],
    # the fused dK/dV/dQ kernel: the dkv search space (same resident tiles, plus the dQ tile)
    "dkvq": [(64, 128, 8, 2), (32, 128, 8, 2), (64, 64, 4, 3), (32, 64, 4, 3), (16, 64, 4, 3), (16, 128, 4, 2),
             (32, 32, 4, 2), (16, 32, 4, 2), (32, 64, 8, 2), (64, 64, 8, 2), (16, 64, 8, 2), (64, 32, 8, 2),
             (32, 128, 8, 1), (16, 128, 8, 2), (128, 32, 8, 2), (64, 32, 4, 2)],
    "dq": [(128, 64, 8, 2), (128, 32, 4, 3), (64, 64, 4, 3), (64, 32, 4, 3), (32, 64, 4, 3), (16, 64, 4, 3),
           (16, 32, 4, 2),
           (64, 64, 8, 3), (128, 32, 8, 3), (128, 64, 8, 1), (64, 32, 8, 3), (32, 64, 8, 3), (128, 32, 8, 2),
           (64, 64, 8, 2)],
}
_DTYPE_NAME = {torch.float16: "fp16", torch.bfloat16: "bf16", torch.float32: "fp32"}
_PTR = {"TID": "*i64", "KPM": "*i8", "LSE": "*fp32", "DELTA": "*fp32", "DPK": "*fp32", "DPV": "*fp32", "PART": "*fp32",
        "RNG": "*i64", "DQA": "*fp32"}
_TENSORS = {"Q", "K", "V", "PK", "PV", "O", "DO", "DK", "DV", "DQ", "OUT", *_PTR}
_FLOATS = {"qk_scale", "dropout_p", "scale"}


def _signature(fn, consts, dtype):
    sig, attrs = {}, {}
    for i, name in enumerate(fn.arg_names):
        if name in consts:
            sig[name] = "constexpr"
        elif name in _TENSORS:
            sig[name] = _PTR.get(name, "*" + _DTYPE_NAME[dtype])
            attrs[(i,)] = [["tt.divisibility", 16]]
        elif name in _FLOATS:
            sig[name] = "fp32"
        else:
            sig[name] = "i32"
            if name.startswith("s"):  # strides of aligned [.., D] tensors, D % 16 == 0
                attrs[(i,)] = [["tt.divisibility", 16]]
    return sig, attrs


_LOG_RE = {
    "regs": re.compile(r"Used (\d+) registers"),
    "spill_stores": re.compile(r"(\d+) bytes spill stores"),
    "spill_loads": re.compile(r"(\d+) bytes spill loads"),
}


def compile_one(job: dict) -> dict:
    """AOT-compile one (kernel, config, shape, flags, target); returns the job + resources."""
    fn = KERNELS[job["kernel"]]
    dtype = getattr(torch, job["dtype"])
    consts = dict(tri.kernel_constexprs(job["D"], dtype, causal=job["causal"], dropout=job["dropout"],
                                        kpm=True, bank=True, store_lse=True, interpret=False),
                  **EXTRA_CONSTS.get(job["kernel"], {}), **job["meta"])
    consts = {k: v for k, v in consts.items() if k in fn.arg_names}
    sig, attrs = _signature(fn, consts, dtype)
    log = io.StringIO()
    t0 = time.perf_counter()
    with contextlib.redirect_stdout(log):
        k = triton.compile(ASTSource(fn, sig, consts, attrs), target=GPUTarget("cuda", job["target"], 32),
                           options={"num_warps": job["num_warps"], "num_stages": job["num_stages"]})
    res = dict(job, seconds=round(time.perf_counter() - t0, 2), shared=int(k.metadata.shared), src=source_hash(job))
    text = log.getvalue()
    if not _LOG_RE["regs"].search(text):
        raise RuntimeError(f"no ptxas log for {job} (compile cache hit?)")
    for key, rx in _LOG_RE.items():
        vals = [int(v) for v in rx.findall(text)]
        res[key] = max(vals) if vals else 0
    res["fits"] = res["shared"] <= SMEM_LIMIT[job["target"]]
    return res


def _configs(kernel, D, dtype, S, T, P, dropout, candidates):
    if candidates and kernel in CANDIDATES:
        return [dict(BLOCK_M=m, BLOCK_N=n, num_warps=w, num_stages=st) for m, n, w, st in CANDIDATES[kernel]]
    return [dict(c.kwargs, num_warps=c.num_warps, num_stages=c.num_stages)
            for c in tri.configs_for(kernel, D, dtype, S=S, T=T, P=P, dropout=dropout)]


def source_hash(job) -> str:
    """The kernel's source hash (Triton's ``cache_key``: its code and the functions it calls)."""
    return KERNELS[job["kernel"]].cache_key[:16]


def _job_key(j):
    return (j["kernel"], j["D"], j["dtype"], j["causal"], j["dropout"], j["target"], tuple(sorted(j["meta"].items())),
            j["num_warps"], j["num_stages"], source_hash(j))


def jobs(head_dims=(64, 80, 96, 128), dtypes=("bfloat16", "float16"), causals=(True, False),
         dropouts=(False, True), kernels=tuple(KERNELS), targets=TARGETS, S=4096, T=4096, P=128, candidates=False):
    """Every config the autotuner can pick for long sequences (the largest candidate set); with
    ``candidates``, the whole pre-pruning search space instead. "dkvq" is compiled without dropout
    whatever ``dropouts`` says (it never runs with it)."""
    out = []
    for kernel, D, dt, causal, dropout, target in itertools.product(kernels, head_dims, dtypes, causals, dropouts,
                                                                   targets):
        if kernel in ("pre", "reduce") and (causal is not causals[0] or dropout is not dropouts[0]):
            continue  # flags do not reach these two
        if kernel == "dkvq":  # the fused backward never runs with dropout (backward_path): compile it without
            if dropout is not dropouts[0]:
                continue
            dropout = False
        for c in _configs(kernel, D, getattr(torch, dt), S, T, P, dropout, candidates):
            meta = {k: v for k, v in c.items() if k not in ("num_warps", "num_stages")}
            out.append(dict(kernel=kernel, D=D, dtype=dt, causal=causal, dropout=dropout, target=target, meta=meta,
                            num_warps=c["num_warps"], num_stages=c["num_stages"]))
    return out


def run(job_list, workers=None, progress=False, reuse=()):
    """Compile ``job_list``; a job found in ``reuse`` (earlier results with the same kernel source
    hash, Triton version and flags) is taken from there instead (marked ``reused``)."""
    known = {_job_key(r): dict(r, reused=True) for r in reuse
             if r.get("src") and r.get("triton") == triton.__version__ and r.get("regs")}
    done = [known[_job_key(j)] for j in job_list if _job_key(j) in known]
    job_list = [j for j in job_list if _job_key(j) not in known]
    workers = workers or max(1, os.cpu_count() or 1)
    out = list(done)
    with ProcessPoolExecutor(workers) as ex:
        for i, res in enumerate(ex.map(compile_one, job_list)):
            out.append(dict(res, triton=triton.__version__))
            if progress and (i + 1) % 10 == 0:
                print(f"  {i + 1}/{len(job_list)} compiled", file=sys.stderr, flush=True)
    return out


def _flags(results) -> str:
    both = lambda name: {r[name] for r in results} == {True, False}  # noqa: E731
    if both("causal") and both("dropout"):
        return "causal and dropout both ways"
    return ", ".join(f"{n} = {sorted({r[n] for r in results})[0]}" for n in ("causal", "dropout") if not both(n))


def markdown(results, command, seconds, title=None, candidates=False) -> str:
    bad = [r for r in results if r["spill_stores"] or r["spill_loads"] or not r["fits"]]
    title = title or f"# Triton AOT resources: prefix attention kernels ({_dt.date.today().isoformat()})"
    lines = [
        title, "",
        f"Command: `{command}`", "",
        f"Triton {triton.__version__}, ptxas from Triton's bundle; {len(results)} compiles"
        + (f" ({sum(1 for r in results if r.get('reused'))} taken from an earlier run with the same kernel source "
           f"hashes: `--reuse`)" if any(r.get("reused") for r in results) else "")
        + f", {seconds:.0f} s in this run on {os.cpu_count()} CPU cores; compile time summed over all: "
        f"{sum(r['seconds'] for r in results):.0f} s. "
        + ("The whole `--candidates` search space (`CANDIDATES`: the tiles autotuned before the spill pruning, then "
           "8-warp tiles added to find spill-free ones)" if candidates else
           "Every config `configs_for` lets the autotuner pick (S = T = 4096, P = 128)")
        + f", flags IS_BANK = HAS_KPM = True (the most registers), {_flags(results)}. "
        f"Shared-memory limits: sm_80 {SMEM_LIMIT[80]} B, sm_90 {SMEM_LIMIT[90]} B.", "",
        f"**{len(bad)} of {len(results)} compiles spill or exceed shared memory.**", "",
        "| kernel | D | dtype | causal | dropout | tile (BLOCK_M x BLOCK_N), warps, stages | target | registers "
        "| spill stores / loads (B) | shared (B) |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    key = lambda r: (r["kernel"], r["D"], r["dtype"], not r["causal"], r["dropout"],  # noqa: E731
                     [-x for x in r["meta"].values()], r["num_warps"], r["target"])
    for r in sorted(results, key=key):
        spill = f"{r['spill_stores']} / {r['spill_loads']}"
        if r["spill_stores"] or r["spill_loads"]:
            spill = f"**{spill}**"
        lines.append(
            f"| {r['kernel']} | {r['D']} | {r['dtype']} | {r['causal']} | {r['dropout']} | "
            f"{'x'.join(str(x) for x in r['meta'].values())}, {r['num_warps']}, {r['num_stages']} | sm_{r['target']} | "
            f"{r['regs']} | "
            f"{spill} | {r['shared']}{'' if r['fits'] else ' (too big)'} |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="D=128 and D=64, bf16, causal+dropout only")
    ap.add_argument("--head-dims", type=int, nargs="*")
    ap.add_argument("--worst-flags", action="store_true",
                    help="only causal + dropout (the most registers), not all four combinations")
    ap.add_argument("--kernels", nargs="*", choices=list(KERNELS))
    ap.add_argument("--workers", type=int)
    ap.add_argument("--dtypes", nargs="*", choices=["bfloat16", "float16", "float32"])
    ap.add_argument("--candidates", action="store_true",
                    help="compile the whole pre-pruning search space (CANDIDATES), not configs_for's choice")
    ap.add_argument("--out", default=os.path.join("benchmarks", "results",
                                                  f"triton-aot-{_dt.date.today().isoformat()}.md"))
    ap.add_argument("--json", help="also write the raw results as JSON ('-' = stdout)")
    ap.add_argument("--check", action="store_true", help="exit 1 when anything spills or does not fit")
    ap.add_argument("--reuse", nargs="*", default=[],
                    help="JSON files of earlier runs (--json): identical jobs with the same kernel source hash are "
                         "taken from there instead of being compiled again")
    ap.add_argument("--append", action="store_true", help="append a section to --out instead of rewriting it")
    ap.add_argument("--title", help="the section's Markdown heading")
    args = ap.parse_args(argv)
    kw = {}
    if args.quick:
        kw = dict(head_dims=(64, 128), dtypes=("bfloat16",), causals=(True,), dropouts=(True,))
    if args.worst_flags:
        kw.update(causals=(True,), dropouts=(True,))
    if args.head_dims:
        kw["head_dims"] = tuple(args.head_dims)
    if args.kernels:
        kw["kernels"] = tuple(args.kernels)
    if args.dtypes:
        kw["dtypes"] = tuple(args.dtypes)
    kw["candidates"] = args.candidates
    t0 = time.perf_counter()
    reuse = [r for path in args.reuse for r in json.load(open(path))["results"]]
    results = run(jobs(**kw), args.workers, progress=True, reuse=reuse)
    seconds = time.perf_counter() - t0
    command = "python scripts/triton_aot_report.py " + shlex.join(argv if argv is not None else sys.argv[1:])
    if args.json:
        text = json.dumps({"seconds": seconds, "results": results}, indent=1)
        if args.json == "-":
            print(text)
        else:
            with open(args.json, "w") as f:
                f.write(text)
    if args.out and args.out != "-":
        with open(args.out, "a" if args.append else "w") as f:
            f.write(("\n" if args.append else "") + markdown(results, command.strip(), seconds, args.title,
                                                                    args.candidates))
    bad = [r for r in results if r["spill_stores"] or r["spill_loads"] or not r["fits"]]
    print(f"{len(results)} compiles in {seconds:.0f} s; {len(bad)} spill or exceed shared memory", file=sys.stderr)
    return 1 if (args.check and bad) else 0


if __name__ == "__main__":
    sys.exit(main())
