"""The one end-to-end benchmark runner: PEFT vs PEFT + ``ptune_fast.patch`` on the same weights.

    python -m benchmarks.run --list                                   # the suites and their cases
    python -m benchmarks.run all --preset smoke --out-dir /tmp/bench  # every code path, < 1 min on CPU
    python -m benchmarks.run train_step --threads 1                   # CPU, preset small
    python -m benchmarks.run fold_bank --threads 1
    python -m benchmarks.run e2e --threads 1
    python -m benchmarks.run e2e --device cuda --preset 1b            # GPU, Llama-3.2-1B shape, bf16
    python -m benchmarks.run --render benchmarks/results/cpu-<date>/e2e.json   # Markdown + plots again
    python -m benchmarks.run --readme benchmarks/results/cpu-<date>/*.json     # the README section

Suites, cases and presets are data (:mod:`benchmarks.cases`); how each thing is measured is in
:mod:`benchmarks.measure`; the results writer (JSON, then Markdown, then optional plots) in
:mod:`benchmarks.report`. Before timing, every case checks untimed that the two implementations
agree (loss, logits on the real tokens, gradients; generated tokens) and records it.

Where one command may run at most ~10 minutes (the lent GPU machines), split a run with ``--only``
and ``--name``; every part writes its own files in the same directory::

    python -m benchmarks.run e2e --device cuda --only train memory gc profile --name e2e-train
    python -m benchmarks.run e2e --device cuda --only generate --name e2e-generate
    python -m benchmarks.run e2e --device cuda --only maxbatch --mem-cap-gib 40 --name e2e-maxbatch
"""
from __future__ import annotations

import argparse
import copy
import functools
import gc
import os
import sys
import time
from types import SimpleNamespace

import torch

from benchmarks import cases as C
from benchmarks import measure as M
from benchmarks import report as R

MEASUREMENTS = ("train", "prefill", "generate", "bank", "encoder", "memory", "attention", "profile", "gc",
                "maxbatch", "sdpa", "base", "one_batch")


# ------------------------------------------------------------------------------ building a case


def prepare(case, model, dev, dtype):
    """Build what a case times: ``fns`` ({impl: fn}), untimed ``parity``, ``tokens`` per call (for
    tok/s), ``tokens_through_model``, ``models`` ({impl: PEFT model}, for the profiler) and
    ``trainers`` (train cases). Shared by the runner and ``bench_e2e.py``."""
    kind, m, d = case["kind"], case["method"], set(case["measure"])
    p = SimpleNamespace(fns={}, parity={}, tokens=None, tokens_through_model=None, models={}, trainers={}, extra={})
    B, S, nv = case["B"], case["S"], case["nv"]
    if kind == "train":
        pm = C.build_peft(case, model, dev, dtype)
        p.models = {C.PEFT: pm, C.FAST: C.make_fast(pm)}
        if "gc" in d and C.is_prefix(m):
            p.models[C.FAST_GC] = C.make_fast(pm, gradient_checkpointing=True)
        p.trainers = {k: C.Trainer(x, B, S, dev) for k, x in p.models.items()}
        skip = 0 if C.is_prefix(m) else nv
        p.parity = C.train_parity(p.trainers[C.PEFT], p.trainers[C.FAST], skip)
        if C.FAST_GC in p.trainers:
            p.parity["gc_vs_no_gc"] = C.train_parity(p.trainers[C.FAST], p.trainers[C.FAST_GC], 0)
        p.fns = {k: t.step for k, t in p.trainers.items()}
        if "sdpa" in d:
            with M.sdpa_attention():
                p.parity["sdpa_diagnostic"] = C.train_parity(p.trainers[C.PEFT], p.trainers[C.FAST], skip)
            p.fns[C.DIAG] = M.with_sdpa(p.trainers[C.FAST].step)  # same model and optimizer: timing only
        p.tokens = B * S
        p.tokens_through_model = ({C.PEFT: B * S, C.FAST: B * S} if C.is_prefix(m)
                                  else {C.PEFT: B * (nv + S), C.FAST: nv + B * S})
    elif kind == "prefill":
        import ptune_fast

        pm = C.build_peft(case, model, dev, dtype).eval()
        fast = ptune_fast.patch(copy.deepcopy(pm), outputs="real")  # S real positions, as compared below
        p.extra["fold_report"] = {k: list(v) if isinstance(v, (list, tuple)) else v
                                  for k, v in ptune_fast.fold(fast).items()}
        ids = C.make_ids(B, S, pm.get_base_model().config.vocab_size, dev)
        mask = torch.ones_like(ids)
        p.models = {C.PEFT: pm, C.FAST: fast}
        p.fns = {C.PEFT: C.forward_fn(pm, ids, mask), C.FAST: C.forward_fn(fast, ids, mask)}
        ref = p.fns[C.PEFT]()[:, nv:]
        p.parity = {"max_abs_logit": C.max_abs(ref), "max_abs_logit_diff": C.max_abs(p.fns[C.FAST]() - ref)}
        if "sdpa" in d:
            p.fns[C.DIAG] = M.with_sdpa(p.fns[C.FAST])
            p.parity["max_abs_logit_diff_sdpa_diagnostic"] = C.max_abs(p.fns[C.DIAG]() - ref)
        if "base" in d:
            p.fns[C.BASE] = C.forward_fn(pm.get_base_model(), ids, mask)
        p.tokens, p.tokens_through_model = B * S, {C.PEFT: B * (nv + S), C.FAST: B * S}
    elif kind == "generate":
        pm = C.build_peft(case, model, dev, dtype).eval()
        fast = C.make_fast(pm).eval()
        ids = C.make_ids(B, S, pm.get_base_model().config.vocab_size, dev, seed=C.SEED + 7)
        p.models = {C.PEFT: pm, C.FAST: fast}
        p.fns = {k: C.gen_fn(x, ids, case["new_tokens"]) for k, x in p.models.items()}
        ref, got = p.fns[C.PEFT](), p.fns[C.FAST]()
        p.parity = {"generated_tokens": ref.numel(), "generated_tokens_equal": int((ref == got).sum())}
        p.tokens = B * case["new_tokens"]
    elif kind == "bank":
        bank = C.BankCase(case, model, dev, dtype)
        call = case["call"]
        p.fns = {C.PEFT: functools.partial(bank.peft_call, call), C.FAST: functools.partial(bank.bank_call, call)}
        if "one_batch" in d:
            p.fns[C.ONE_BATCH] = functools.partial(bank.peft_one_batch, call)
        p.parity = bank.parity()
        if "sdpa" in d:
            p.fns[C.DIAG] = M.with_sdpa(p.fns[C.FAST])
            with M.sdpa_attention():
                p.parity["sdpa_diagnostic"] = bank.parity()
        p.tokens = bank.B * (bank.S if call == "forward" else bank.G)
        p.extra["bank"] = bank
    else:
        raise ValueError(f"case kind must be train, prefill, generate or bank, got {kind!r}")
    return p


# ------------------------------------------------------------------------------ measuring a case


def wanted(case, only):
    """The measurements of ``case`` that run: its kind's timing and its ``measure``, filtered by ``only``."""
    have = [case["kind"]] + list(case["measure"])
    return [x for x in have if only is None or x in only]


def run_case(case, model, dev, dtype, reps, only=None, mem_cap_gib=40.0, max_batch_limit=4096):
    """One row: the case's fields, its timings (``time`` / ``speedup`` / ``paired_speedup`` / ``verdict``),
    ``parity`` and every extra measurement asked for."""
    todo = set(wanted(case, only))
    row = {k: v for k, v in case.items() if k != "measure"}
    row.update(measure=list(case["measure"]), model=model)
    if todo - {"maxbatch"}:
        p = prepare(case, model, dev, dtype)
        row["parity"] = p.parity
        row.update({k: v for k, v in p.extra.items() if k != "bank"})
        if p.tokens_through_model:
            row["tokens_through_model"] = p.tokens_through_model
        if case["kind"] in todo:
            row.update(M.compare(p.fns, dev, *reps[case["kind"]], tokens=p.tokens))
        else:  # optimizer state exists before memory is measured
            for t in p.trainers.values():
                t.step()
        _extras(row, p, todo, dev, reps)
        if "gc" in todo and C.is_prefix(case["method"]):
            row["peft_gc"] = C.peft_gc_refusal(case, model, dev, dtype)
        del p
        gc.collect()
    if "maxbatch" in todo:
        row["max_batch"] = _max_batches(case, model, dev, dtype, mem_cap_gib, max_batch_limit)
    return row


def _extras(row, p, todo, dev, reps):
    tr = p.trainers
    if "encoder" in todo and tr:
        enc = M.compare({k: tr[k].encoder for k in (C.PEFT, C.FAST)}, dev, *reps["encoder"])
        row["encoder"], row["encoder_speedup"] = enc["time"], enc["speedup"]
    if "memory" in todo and tr:
        row.update(peak_bytes={}, saved_bytes={}, prefix_bytes={}, encoder_calls_per_step={})
        for k, t in tr.items():
            before = t.encoder_calls()
            t.step()
            row["encoder_calls_per_step"][k] = None if before is None else t.encoder_calls() - before
            t.opt.zero_grad(set_to_none=True)  # grads freed before the measurement: not counted
            row["peak_bytes"][k] = M.peak_bytes(t.step, dev)
            t.opt.zero_grad(set_to_none=True)
            row["saved_bytes"][k] = M.saved_bytes(t.forward_loss, t.params)
            row["prefix_bytes"][k] = C.prefix_bytes(t.pm, k, t.B)
        row["state_bytes_measured"] = tr[C.FAST].state_bytes()
    if "attention" in todo:
        row["attention"] = {k: M.attention_share(f, dev, reps["attention"]) for k, f in p.fns.items()}
    if "profile" in todo and p.models:
        fns = {k: (tr[k].step if tr else p.fns[k], pm) for k, pm in p.models.items()}
        row["breakdown"] = M.breakdowns(fns, dev, reps["profile"])


def _max_batches(case, model, dev, dtype, cap_gib, limit):
    if dev.type != "cuda":
        return "Skipped on CPU: the search needs a device memory cap; run with `--device cuda`."
    makers = {C.PEFT: lambda: C.build_peft(case, model, dev, dtype),
              C.FAST: lambda: C.make_fast(C.build_peft(case, model, dev, dtype), copy_model=False)}
    if C.is_prefix(case["method"]):
        makers[C.FAST_GC] = lambda: C.make_fast(C.build_peft(case, model, dev, dtype), True, copy_model=False)
    out = {}
    for k, make in makers.items():
        gc.collect()
        torch.cuda.empty_cache()
        out[k] = M.max_batch(C.Trainer(make(), 1, case["S"], dev), case["S"], dev, int(cap_gib * 2**30), limit)
    return out


# ------------------------------------------------------------------------------ command line


def _list():
    for suite in C.SUITES:
        for preset in C.SUITES[suite]:
            model, dtype, _, cases = C.expand(suite, preset)
            print(f"{suite} --preset {preset}  ({model}, {dtype}, {len(cases)} cases)")
            for c in cases:
                print(f"    {c['id']:50s} measure: {', '.join([c['kind'], *c['measure']])}")


def parse(argv=None):
    ap = argparse.ArgumentParser(prog="python -m benchmarks.run", description=__doc__.split("\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter,
                                 epilog="\n".join(__doc__.split("\n")[1:10]))
    ap.add_argument("suites", nargs="*", metavar="SUITE", help=f"one or more of {', '.join(C.SUITES)}, or all")
    ap.add_argument("--preset", choices=C.PRESETS, help="case grid and model size (default: small on cpu, 1b on cuda)")
    ap.add_argument("--device", default="cpu", help="cpu or cuda (default cpu)")
    ap.add_argument("--dtype", choices=("float32", "bfloat16", "float16"), help="default: the preset's")
    ap.add_argument("--only", nargs="+", choices=MEASUREMENTS, metavar="MEASUREMENT",
                    help=f"run only these measurements: {', '.join(MEASUREMENTS)}")
    ap.add_argument("--methods", nargs="+", choices=C.METHODS, metavar="METHOD",
                    help=f"only cases of these methods: {', '.join(C.METHODS)}")
    ap.add_argument("--batches", nargs="+", type=int, help="only cases with these batch sizes")
    ap.add_argument("--warmup", type=int, help="untimed calls per implementation (default: the preset's)")
    ap.add_argument("--repeat", type=int, help="timed calls per implementation (default: the preset's)")
    ap.add_argument("--threads", type=int, help="torch.set_num_threads (default 1 on cpu; 0 = torch's default)")
    ap.add_argument("--mem-cap-gib", type=float, default=40.0, help="memory cap of the largest-batch search (GPU)")
    ap.add_argument("--max-batch-limit", type=int, default=4096, help="largest B the search tries (GPU)")
    ap.add_argument("--out-dir", help="default: benchmarks/results/<device>-<date>")
    ap.add_argument("--name", help="file stem of the JSON / Markdown / plots (default: the suites' names)")
    ap.add_argument("--no-write", action="store_true", help="print the Markdown only")
    ap.add_argument("--no-plots", action="store_true", help="write JSON and Markdown, no plots")
    ap.add_argument("--list", action="store_true", help="print the suites and their cases, measure nothing")
    ap.add_argument("--render", metavar="JSON", help="measure nothing: Markdown and plots again from a saved report")
    ap.add_argument("--readme", nargs="+", metavar="JSON", help="measure nothing: print the README section")
    args = ap.parse_args(argv)
    modes = sum(map(bool, (args.list, args.render, args.readme)))
    if modes > 1:
        ap.error("--list, --render and --readme exclude each other")
    if not modes:
        if not args.suites:
            ap.error(f"SUITE is required: one or more of {', '.join(C.SUITES)}, or all")
        bad = [s for s in args.suites if s not in C.SUITES and s != "all"]
        if bad:
            ap.error(f"SUITE must be one of {', '.join(C.SUITES)} or all, got {', '.join(map(repr, bad))}")
        for name in ("warmup", "repeat", "threads"):
            v = getattr(args, name)
            if v is not None and v < (1 if name == "repeat" else 0):
                ap.error(f"--{name} must be >= {1 if name == 'repeat' else 0}, got {v}")
        try:
            args.dev = torch.device(args.device)
        except RuntimeError as exc:
            ap.error(f"--device: {exc}")
        if args.dev.type == "cuda" and not torch.cuda.is_available():
            ap.error("--device cuda, but torch.cuda.is_available() is False")
        if args.dev.type not in ("cpu", "cuda"):
            ap.error(f"--device must be cpu or cuda, got {args.device!r}")
    return args


def main(argv=None):
    args = parse(argv)
    if args.list:
        return _list()
    try:
        if args.render:
            return R.rerender(args.render, plots=not args.no_plots)
        if args.readme:
            print(R.readme_section(args.readme))
            return None
    except (OSError, ValueError) as exc:
        raise SystemExit(f"benchmarks.run {'--render' if args.render else '--readme'}: {exc}") from None
    dev = args.dev
    preset = args.preset or ("1b" if dev.type == "cuda" else "small")
    suites = list(C.SUITES) if "all" in args.suites else list(dict.fromkeys(args.suites))
    threads = args.threads if args.threads is not None else (1 if dev.type == "cpu" else 0)
    if threads:
        torch.set_num_threads(threads)
    plan, models, dtypes, reps = [], {}, set(), None
    for suite in suites:
        model, dtype, reps, cases = C.expand(suite, preset)
        dtype = args.dtype or dtype
        for c in cases:
            if ((args.methods and c["method"] not in args.methods) or (args.batches and c["B"] not in args.batches)
                    or not wanted(c, args.only)):
                continue
            plan.append((c, model, getattr(torch, dtype)))
            models[model], dtypes = C.MODELS[model], dtypes | {dtype}
    if not plan:
        raise SystemExit("benchmarks.run: no case left after --only / --methods / --batches")
    reps = {k: (args.warmup if args.warmup is not None else v[0], args.repeat or v[1]) if isinstance(v, tuple) else v
            for k, v in reps.items()}
    t0, load0, env = time.perf_counter(), R.loadavg(), R.env_info(dev)
    rows = []
    for i, (c, model, dtype) in enumerate(plan):
        rows.append(run_case(c, model, dev, dtype, reps, set(args.only) if args.only else None,
                             args.mem_cap_gib, args.max_batch_limit))
        r = rows[-1]
        line = f"[{i + 1}/{len(plan)}] {c['id']}"
        if C.FAST in r.get("speedup", {}):
            line += (f"  PEFT {r['time'][C.PEFT]['median_ms']:.1f} ms  ptune_fast {r['time'][C.FAST]['median_ms']:.1f}"
                     f" ms  speedup {r['speedup'][C.FAST]:.2f}x ({r['verdict'][C.FAST]})")
        print(line, file=sys.stderr, flush=True)
    from ptune_fast import _backend

    cmd = sys.argv[1:] if argv is None else list(argv)
    report = {"env": env, "command": " ".join(["python -m benchmarks.run"] + cmd), "suites": suites,
              "preset": preset, "models": models, "dtype": "/".join(sorted(dtypes)), "reps": reps,
              "only": args.only, "wall_s": time.perf_counter() - t0, "loadavg_before": load0,
              "loadavg_after": R.loadavg(), "rows": rows,
              "backend_calls": {f"{op} -> {be}": n for (op, be), n in sorted(_backend.CALLS.items())},
              "fallbacks": {" / ".join(map(str, k)): n for k, n in _backend.FALLBACKS.items()}}
    report["notes"] = R.notes(report)
    if args.no_write:
        print(R.render(report))
    else:
        out_dir = args.out_dir or os.path.join(R.RESULTS, f"{env['device_tag']}-{env['date'][:10]}")
        R.write(report, out_dir, args.name or ("all" if "all" in args.suites else "-".join(suites)),
                plots=not args.no_plots)
    return report


if __name__ == "__main__":
    main()
