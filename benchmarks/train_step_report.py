"""PEFT vs ``ptune_fast.patch`` training step on a small Llama: a Markdown table + JSON.

    python -m benchmarks.train_step_report                 # CPU here, CUDA where present
    python -m benchmarks.train_step_report --repeat 30 --threads 0    # torch's default threads

For each (method, B) it builds two identical PEFT models (same seed), patches one, and times
the training step (forward + backward + AdamW step) of both **interleaved** -- PEFT, patched,
patched, PEFT, ... -- so that load from other processes hits both alike. Reported: median and
IQR (q1-q3) of ``--repeat`` steps after ``--warmup`` untimed ones, the ratio of medians
(PEFT / ptune_fast: > 1 means ptune_fast is faster), the encoder forward alone timed the same
way, the prefix bytes (computed from shapes), and the measured peak / saved-for-backward
tensor memory of one step (see :mod:`benchmarks.common` for exactly what they count).

Writes ``benchmarks/results/<device>-train-step-<date>.md`` and ``.json``.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time

import torch

from benchmarks import common as C

RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")
IMPLS = ("peft", "ptune_fast")


def interleaved(fns, dev, warmup, repeat):
    """Per-fn seconds; calls alternate ABBA... so drift and foreign load hit every fn alike."""
    for _ in range(warmup):
        for f in fns:
            f()
    C.sync(dev)
    times = [[] for _ in fns]
    order = list(range(len(fns)))
    for i in range(repeat):
        for j in (order if i % 2 == 0 else order[::-1]):
            t0 = time.perf_counter()
            fns[j]()
            C.sync(dev)
            times[j].append(time.perf_counter() - t0)
    return times


def stats_ms(xs):
    med, q1, q3 = C.median_iqr(xs)
    return {"median_ms": med * 1e3, "q1_ms": q1 * 1e3, "q3_ms": q3 * 1e3, "n": len(xs)}


def measure(method, B, dev, warmup, repeat, enc_repeat):
    cases = [C.make_case(method, impl, B, dev=dev) for impl in IMPLS]
    step_t = interleaved([c.step for c in cases], dev, warmup, repeat)
    enc_t = interleaved([c.encoder for c in cases], dev, warmup, enc_repeat)
    row = {"method": method, "B": B, "S": C.SEQ_LEN, "P": C.NUM_VIRTUAL_TOKENS}
    for c, st, et in zip(cases, step_t, enc_t):
        calls_before = _encoder_calls(c)
        c.step()
        calls = _encoder_calls(c) - calls_before if calls_before is not None else None
        c.opt.zero_grad(set_to_none=True)  # grads freed before the profiler starts: not counted
        peak = C.peak_bytes(c.step, dev)
        c.opt.zero_grad(set_to_none=True)
        saved = C.saved_bytes(c.forward_loss, [p for g in c.opt.param_groups for p in g["params"]])
        attn = C.attention_ms(c.step, dev)
        s, e = stats_ms(st), stats_ms(et)
        row[c.impl] = {
            "step": s,
            "encoder": e,
            "encoder_share": e["median_ms"] / s["median_ms"],
            "encoder_input_rows": (B if c.impl == "peft" and method.startswith("prefix") else 1) * c.shape["P"],
            "encoder_calls_per_step": calls,
            "prefix_bytes": c.prefix_bytes(),
            "state_bytes_measured": c.state_bytes(),
            "attention_ms_profiled": attn["attention_ms"],
            "profiled_step_ms": attn["profiled_step_ms"],
            "peak_bytes": peak,
            "saved_bytes": saved,
        }
    # ratio of medians, and the median of per-pair ratios (pairs were timed back to back)
    p, f = step_t
    row["ratio"] = C.median_iqr(p)[0] / C.median_iqr(f)[0]
    row["paired_ratio_median"] = C.median_iqr([a / b for a, b in zip(p, f)])[0]
    return row


def _encoder_calls(case):
    patch = getattr(case.pm, "_ptune_fast_patch", None)
    if patch is None:
        return None
    state = patch.state
    return state.encoder_calls if state is not None else patch.encoder_calls


def _mb(n):
    return f"{n / 2**20:.2f}"


def _ms(s):
    return f"{s['median_ms']:.1f} [{s['q1_ms']:.1f}-{s['q3_ms']:.1f}]"


def _ems(s):
    return f"{s['median_ms']:.3f} [{s['q1_ms']:.3f}-{s['q3_ms']:.3f}]"


def markdown(report):
    env, rows = report["env"], report["rows"]
    dev = env.get("gpu") or env["cpu"]
    out = [
        f"# Training step: PEFT vs ptune_fast ({env['device']})",
        "",
        f"* device: {env['device']} -- {dev} ({env['cpu_count']} logical CPUs, torch threads: {env['torch_threads']})",
        f"* versions: torch {env['torch']}, transformers {env['transformers']}, peft {env['peft']}, "
        f"ptune_fast {env['ptune_fast']} (git {env['git_commit']}), python {env['python']}; "
        f"PTUNE_FAST_BACKEND={env['backend_env']}",
        f"* date: {env['date']}",
        "* ptune_fast backends that served the ops in this run: "
        + (", ".join(f"{k} x{v}" for k, v in report.get("backend_calls", {}).items()) or "none recorded"),
        f"* command: `{report['command']}` (wall time {report['wall_s']:.0f} s)",
        f"* load average (1 min) before / after: {report['loadavg_before']} / {report['loadavg_after']}",
        "* model: Llama from config, hidden {hidden_size}, {num_hidden_layers} layers, {num_attention_heads} heads, "
        "{num_key_value_heads} KV heads (head_dim {head_dim}), intermediate {intermediate_size}, vocab {vocab_size}; "
        "seq {seq_len}, P = {num_virtual_tokens} virtual tokens, fp32, AdamW".format(**report["model"]),
        f"* prefix tuning: `PrefixTuningConfig(prefix_projection=True, encoder_hidden_size={C.PREFIX_ENCODER_HIDDEN})`; "
        f"P-tuning: `PromptEncoderConfig(encoder_reparameterization_type='MLP', encoder_hidden_size={C.PTUNING_ENCODER_HIDDEN})`",
        f"* timing: {report['warmup']} warm-up then {report['repeat']} steps per implementation, interleaved "
        f"(encoder: {report['enc_repeat']} calls); median [q1-q3] in ms. ratio = PEFT median / ptune_fast median "
        "(> 1: ptune_fast faster).",
        "",
        "| method | B | PEFT step ms | ptune_fast step ms | ratio | PEFT encoder ms | ptune_fast encoder ms "
        "| PEFT prefix bytes | ptune_fast prefix bytes | PEFT peak MiB | ptune_fast peak MiB "
        "| PEFT saved MiB | ptune_fast saved MiB | PEFT attn ms (prof.) | ptune_fast attn ms (prof.) |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        p, f = r["peft"], r["ptune_fast"]
        out.append(
            f"| {C.METHOD_LABEL.get(r['method'], r['method'])} | {r['B']} | {_ms(p['step'])} | {_ms(f['step'])} "
            f"| {r['ratio']:.2f} | {_ems(p['encoder'])} | {_ems(f['encoder'])} "
            f"| {p['prefix_bytes']:,} | {f['prefix_bytes']:,} | {_mb(p['peak_bytes'])} | {_mb(f['peak_bytes'])} "
            f"| {_mb(p['saved_bytes'])} | {_mb(f['saved_bytes'])} "
            f"| {p['attention_ms_profiled']:.1f} | {f['attention_ms_profiled']:.1f} |"
        )
    out += ["", "What the columns measure:", "",
            "* *step ms*: forward + backward + `AdamW.step()` of the whole model, wall clock"
            + (", `torch.cuda.synchronize`d." if env["device"] == "cuda" else "."),
            "* *encoder ms*: the encoder forward alone, autograd on. PEFT: `get_prompt(B)` (prefix tuning runs the "
            "encoder on B x P prompt tokens; P-tuning runs it on one row and `repeat`s it B times). ptune_fast: prefix "
            "tuning: the patched prefix state's provider (encoder on the P rows, split into [L, Hkv, P, D] K/V); "
            "P-tuning: `ptune_fast.encoders.encode` on the encoder's n rows, once (the patched model then runs "
            "the n virtual tokens through the backbone once per step -- the shared virtual-token pass -- which is "
            "part of the step time, not of this column).",
            "* *prefix bytes*: the K/V of the P virtual tokens a step materializes, computed from shapes "
            "(X = L*2*Hkv*P*D*4 bytes). PEFT prefix tuning: the encoder output (B*X) plus the prefix rows of the "
            "per-layer `torch.cat([prefix ; K/V])` copies in the `DynamicCache` (B*X again): 2*B*X. PEFT P-tuning: the "
            "virtual tokens' rows of every row's per-layer K/V, counted once: B*X (a lower bound). ptune_fast: one "
            "shared keys/values [L, Hkv, P, D]: X -- checked against the patched model's state tensors after a step "
            "(`state_bytes_measured` in the JSON). On CPU the sdpa attention backend still broadcasts the prefix per row "
            "transiently inside the op; that is in the peak column, not here.",
            "* *peak MiB*: measured: peak tensor memory allocated during one step above what was live before it "
            "(weights, optimizer state, batch excluded), "
            + ("`torch.cuda.max_memory_allocated`." if env["device"] == "cuda" else
               "from the CPU allocator events of `torch.profiler.profile(profile_memory=True)`."),
            "* *saved MiB*: measured: distinct storages autograd saves for backward during the forward "
            "(`saved_tensors_hooks`), parameters excluded.",
            "* *attn ms (prof.)*: per step, the attention op's forward + backward under `torch.profiler` (median of 3 "
            "profiler sessions of 2 steps, " + ("device time" if env["device"] == "cuda" else "CPU time incl. children")
            + "): PEFT's `aten::scaled_dot_product_attention` vs ptune_fast's `ptune_fast::prefix_attention`, with "
            "their autograd backward nodes. Profiler overhead inflates it; it attributes the step difference, "
            "it is not a step time.",
            ""]
    notes = report.get("notes") or []
    if notes:
        out += ["Observations (from the numbers above):", ""] + [f"* {n}" for n in notes] + [""]
    return "\n".join(out)


def observations(rows, env, load=None):
    """Plain statements derived from the measured rows (no claims that were not measured)."""
    notes = []
    busy = [x for x in (load or ()) if x is not None and env.get("cpu_count") and x > env["cpu_count"]]
    if busy:
        notes.append(
            f"The machine was shared while this ran (1-min load average up to {max(busy):.1f} on "
            f"{env['cpu_count']} logical CPUs): absolute times are inflated and noisy; each PEFT/ptune_fast pair "
            "was timed back to back (interleaved), so the ratios are the more reliable figure.")
    for method in sorted({r["method"] for r in rows}, key=C.METHODS.index):
        rs = sorted((r for r in rows if r["method"] == method), key=lambda r: r["B"])
        lo, hi = rs[0], rs[-1]
        label = C.METHOD_LABEL.get(method, method)
        pe = [r["peft"]["encoder"]["median_ms"] for r in rs]
        fe = [r["ptune_fast"]["encoder"]["median_ms"] for r in rs]
        notes.append(
            f"{label}: encoder ms from B={lo['B']} to B={hi['B']}: PEFT {pe[0]:.3f} -> {pe[-1]:.3f} "
            f"(x{pe[-1] / pe[0]:.1f}), ptune_fast {fe[0]:.3f} -> {fe[-1]:.3f} (x{fe[-1] / fe[0]:.1f}); encoder input "
            f"rows PEFT {lo['peft']['encoder_input_rows']} -> {hi['peft']['encoder_input_rows']}, ptune_fast "
            + (f"{lo['ptune_fast']['encoder_input_rows']} at every B (same shapes and work at every B, so its "
               "spread across B is timing noise)."
               if len({r["ptune_fast"]["encoder_input_rows"] for r in rs}) == 1 else
               f"{lo['ptune_fast']['encoder_input_rows']} -> {hi['ptune_fast']['encoder_input_rows']}."))
        if method.startswith("prefix"):
            notes.append(
                f"{label}: prefix bytes PEFT {lo['peft']['prefix_bytes']:,} -> {hi['peft']['prefix_bytes']:,}, "
                f"ptune_fast {lo['ptune_fast']['prefix_bytes']:,} at every B.")
        slower = [r for r in rs if r["ratio"] < 1.0]
        faster = [r for r in rs if r["ratio"] >= 1.0]
        if slower:
            notes.append(
                f"{label}: ptune_fast's step is SLOWER than PEFT's at B = "
                + ", ".join(f"{r['B']} (ratio {r['ratio']:.2f})" for r in slower) + ".")
        if faster:
            notes.append(
                f"{label}: ptune_fast's step is faster or equal at B = "
                + ", ".join(f"{r['B']} (ratio {r['ratio']:.2f})" for r in faster) + ".")
        d_step = [r["ptune_fast"]["step"]["median_ms"] - r["peft"]["step"]["median_ms"] for r in rs]
        d_attn = [r["ptune_fast"]["attention_ms_profiled"] - r["peft"]["attention_ms_profiled"] for r in rs]
        notes.append(
            f"{label}: step ms ptune_fast minus PEFT: "
            + ", ".join(f"B={r['B']}: {a:+.1f}" for r, a in zip(rs, d_step))
            + "; attention ms (profiled) ptune_fast minus PEFT: "
            + ", ".join(f"B={r['B']}: {a:+.1f}" for r, a in zip(rs, d_attn)) + ".")
        dpk = [(r["B"], r["peft"]["peak_bytes"] - r["ptune_fast"]["peak_bytes"]) for r in rs]
        notes.append(f"{label}: peak MiB PEFT minus ptune_fast: "
                     + ", ".join(f"B={b}: {d / 2**20:+.2f}" for b, d in dpk) + ".")
    if "ptuning_mlp" in {r["method"] for r in rows}:
        notes.append(
            "P-tuning: PEFT already runs its encoder on one row and `repeat`s the output, so neither side's encoder "
            "cost grows with B. The patched model runs the n virtual tokens through the backbone once per step "
            "(n + B*S tokens instead of PEFT's B*(n+S)) and the real tokens attend to their K/V through "
            "`prefix_attention`.")
    if env["device"] == "cpu":
        notes.append(
            "On CPU ptune_fast's attention runs its `sdpa` backend (torch's fused SDPA over the prefix broadcast "
            "and concatenated inside the call, freed with the call's backward), like PEFT's Llama: the step ratio "
            "here shows the encoder, prefix-copy and shared-pass savings, not a kernel difference. The fused "
            "Triton/CUDA kernels (no per-row prefix copy at all) only run on GPU.")
    return notes


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--repeat", type=int, default=20, help="timed steps per implementation (default 20)")
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--enc-repeat", type=int, default=50, help="timed encoder calls per implementation")
    ap.add_argument("--threads", type=int, default=None,
                    help="torch.set_num_threads; default 1 on CPU (stable on a shared machine), 0 = torch's default")
    ap.add_argument("--methods", nargs="+", default=list(C.METHODS), choices=list(C.METHODS))
    ap.add_argument("--batches", nargs="+", type=int, default=list(C.BATCHES))
    ap.add_argument("--out-dir", default=RESULTS)
    ap.add_argument("--no-write", action="store_true", help="print only")
    ap.add_argument("--render", metavar="JSON", help="re-render the Markdown of an existing JSON report (no timing)")
    args = ap.parse_args(argv)

    if args.render:
        with open(args.render) as f:
            report = json.load(f)
        report["notes"] = observations(report["rows"], report["env"],
                                       (report.get("loadavg_before"), report.get("loadavg_after")))
        md = markdown(report)
        print(md)
        if not args.no_write:
            with open(os.path.splitext(args.render)[0] + ".md", "w") as f:
                f.write(md)
            with open(args.render, "w") as f:
                json.dump(report, f, indent=1)
        return report

    dev = C.device()
    threads = args.threads if args.threads is not None else (1 if dev.type == "cpu" else 0)
    if threads > 0:
        torch.set_num_threads(threads)
    t0 = time.perf_counter()
    load0 = C.loadavg()
    rows = []
    for method in args.methods:
        for B in args.batches:
            row = measure(method, B, dev, args.warmup, args.repeat, args.enc_repeat)
            rows.append(row)
            print(f"{method:12s} B={B:3d}  peft {row['peft']['step']['median_ms']:8.1f} ms  "
                  f"ptune_fast {row['ptune_fast']['step']['median_ms']:8.1f} ms  ratio {row['ratio']:.2f}",
                  file=sys.stderr, flush=True)
    env = C.env_info(dev)
    report = {
        "env": env,
        "command": "python -m benchmarks.train_step_report" + ("" if not argv and len(sys.argv) <= 1
                                                                 else " " + " ".join(argv or sys.argv[1:])),
        "model": C.model_info(),
        "warmup": args.warmup, "repeat": args.repeat, "enc_repeat": args.enc_repeat,
        "loadavg_before": load0, "loadavg_after": C.loadavg(),
        "wall_s": time.perf_counter() - t0,
        "rows": rows,
    }
    from ptune_fast import _backend

    report["backend_calls"] = {f"{op}:{backend}": n for (op, backend), n in sorted(_backend.CALLS.items())}
    report["notes"] = observations(rows, env, (report["loadavg_before"], report["loadavg_after"]))
    md = markdown(report)
    print(md)
    if not args.no_write:
        C.write_report(report, md, args.out_dir, f"{dev.type}-train-step-{env['date'][:10]}")
    return report


if __name__ == "__main__":
    main()
