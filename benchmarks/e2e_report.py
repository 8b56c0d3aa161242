"""The report of :mod:`benchmarks.e2e`: observations, Markdown and matplotlib plots from the
measured rows (``python -m benchmarks.e2e --render <json>`` redoes them from a saved JSON).
"""
from __future__ import annotations

import json
import os

from benchmarks.e2e_profile import BUCKET_LABEL, BUCKETS

#: the implementations a row's measurements are keyed by
PEFT, FAST, FAST_GC = "peft", "ptune_fast", "ptune_fast+gc"
SHORT = {"prefix_proj": "prefix+proj", "prefix": "P-Tuning v2", "ptuning_mlp": "P-tuning MLP",
         "ptuning_lstm": "P-tuning LSTM", "prompt": "prompt tuning"}


def _ms(s):
    f = "{:.1f}" if s["median_ms"] >= 10 else "{:.2f}"
    return f"{f.format(s['median_ms'])} [{f.format(s['q1_ms'])}-{f.format(s['q3_ms'])}]"


def _mib(x):
    return f"{x / 2**20:.1f}"


def _shape(r):
    return f"B={r['B']} S={r['S']} " + (f"P={r['P']}" if "P" in r else f"n={r['n']}")


def _changes(bd, floor=0.015, top=4):
    """'bucket -X ms (a -> b)' for the (at most ``top``) buckets whose PEFT -> ptune_fast change is at
    least ``floor`` of PEFT's profiled total, largest first."""
    p, f = bd[PEFT]["ms"], bd[FAST]["ms"]
    diffs = sorted(((p[k] - f[k], k) for k in BUCKETS), key=lambda x: -abs(x[0]))
    return "; ".join(f"{BUCKET_LABEL[k]} {'-' if d >= 0 else '+'}{abs(d):.1f} ms ({p[k]:.1f} -> {f[k]:.1f})"
                     for d, k in diffs[:top] if abs(d) >= floor * bd[PEFT]["total_ms"])


def _overlap(a, b):
    """True when the two timings' IQRs overlap (the difference is within the run's spread)."""
    return a["q1_ms"] <= b["q3_ms"] and b["q1_ms"] <= a["q3_ms"]


def notes(report):
    """Plain statements computed from the measured rows."""
    out = []
    served = {k.split(" -> ")[1]: v for k, v in report["backend_calls"].items() if k.startswith("prefix_attention -> ")}
    if served and max(served, key=served.get) == "sdpa":
        out.append("ptune_fast's `prefix_attention` ran its `sdpa` backend in this run: it broadcasts the shared "
                   "prefix over the batch and concatenates it onto K/V inside the call, then calls torch's fused "
                   "SDPA -- the kernel PEFT's Llama uses. So on this device the attention work and a per-layer "
                   "concatenation remain on both sides; what ptune_fast removes is the B-row encoder, the "
                   "cache copies of the prefix and, for prompt / P-tuning, the B-1 extra passes of the virtual "
                   "tokens through the frozen model. The fused Triton kernels (no concatenation) run on CUDA only.")
    elif served and max(served, key=served.get) in ("triton", "cuda"):
        out.append(f"ptune_fast's `prefix_attention` ran its `{max(served, key=served.get)}` kernels in this run "
                   "(the shared prefix read in-kernel: no broadcast, no concatenation onto K/V); PEFT's Llama ran "
                   "torch's SDPA on the concatenated cache.")
    for r in report["rows"]:
        st, bd, gn = r.get("step"), r.get("breakdown"), r.get("generate")
        head = f"{r['label']} ({_shape(r)}): "
        if st:
            sp = st[FAST]["speedup_vs_peft"]
            s = (head + f"training step {'faster' if sp >= 1 else 'SLOWER'} with ptune_fast ({sp:.2f}x; PEFT "
                 f"{st[PEFT]['median_ms']:.1f} ms, ptune_fast {st[FAST]['median_ms']:.1f} ms"
                 + ("; the IQRs overlap: within this run's spread" if _overlap(st[PEFT], st[FAST]) else "") + ").")
            t = r["tokens_through_model"]
            if t[PEFT] != t[FAST]:
                s += (f" Tokens through the frozen model per step: PEFT {t[PEFT]}, ptune_fast {t[FAST]} "
                      f"({t[PEFT] / t[FAST]:.2f}x fewer).")
            if bd and _changes(bd):
                s += (f" Profiled step {bd[PEFT]['total_ms']:.0f} -> {bd[FAST]['total_ms']:.0f} ms; largest bucket "
                      "changes: " + _changes(bd) + ".")
            elif bd:
                s += " Profiled, no bucket changes by 1.5% of PEFT's step or more: the two do the same frozen work."
            pk = r.get("peak_bytes")
            if pk:
                s += f" Peak memory {_mib(pk[PEFT])} -> {_mib(pk[FAST])} MiB."
            if FAST_GC in st:
                s += (f" With gradient checkpointing ptune_fast takes {st[FAST_GC]['median_ms']:.1f} ms "
                      f"({st[FAST_GC]['median_ms'] / st[FAST]['median_ms']:.2f}x its step without)"
                      + (f" and peaks at {_mib(pk[FAST_GC])} MiB ({pk[FAST] / pk[FAST_GC]:.1f}x less)" if pk else "")
                      + "; PEFT cannot run this configuration.")
            out.append(s)
        if gn:
            g = gn["speedup"]
            s = (head + f"generation {g:.2f}x ({gn[PEFT]['tokens_per_s']:,.0f} -> {gn[FAST]['tokens_per_s']:,.0f} "
                 f"generated tok/s; {gn['generated_tokens_equal']}/{gn['generated_tokens']} tokens equal"
                 + ("; the IQRs overlap: within this run's spread" if _overlap(gn[PEFT], gn[FAST]) else "") + ").")
            gb = gn.get("breakdown")
            if gb and _changes(gb):
                s += (f" Profiled call {gb[PEFT]['total_ms']:.0f} -> {gb[FAST]['total_ms']:.0f} ms; largest bucket "
                      "changes: " + _changes(gb) + ".")
            out.append(s)
    return out


def render(report):
    env, m, rows = report["env"], report["model"], report["rows"]
    dev = env.get("gpu") or env["cpu"]
    out = [f"# End to end: PEFT vs ptune_fast, every prompt-learning method ({report['device_tag']}, preset "
           f"`{report['preset']}`)", "",
           f"* device: {env['device']} -- {dev} ({env['cpu_count']} logical CPUs, torch threads "
           f"{env['torch_threads']}); load average (1 min) before / after: {report['loadavg_before']} / "
           f"{report['loadavg_after']}",
           f"* versions: torch {env['torch']}, transformers {env['transformers']}, peft {env['peft']}, ptune_fast "
           f"{env['ptune_fast']} (git {env['git_commit']}"
           + (f"; uncommitted: {', '.join(env['dirty_files_under_ptune_fast'])}" if env.get("dirty_files_under_ptune_fast")
              else "") + f"), python {env['python']}; "
           f"PTUNE_FAST_BACKEND={env['backend_env']}",
           f"* date: {env['date']}",
           f"* command: `{report['command']}` -- wall time {report['wall_s']:.0f} s",
           "* ptune_fast backends that served calls: "
           + (", ".join(f"`{k}` x{v}" for k, v in report["backend_calls"].items()) or "-"),
           f"* model: LlamaForCausalLM from its config, random weights: hidden {m['hidden_size']}, "
           f"{m['num_hidden_layers']} layers, {m['num_attention_heads']} heads, {m['num_key_value_heads']} KV heads "
           f"(head_dim {m['head_dim']}), intermediate {m['intermediate_size']}, vocab {m['vocab_size']}; "
           f"{report['dtype']}; AdamW(lr=1e-3) on the trainable parameters; PEFT's default encoder sizes",
           f"* shapes: prefix methods {_shape(dict(report['shapes']['prefix']))}; prompt / P-tuning "
           f"{_shape(dict(report['shapes']['prompt']))}; generation: {report['shapes']['gen']['prompts']} prompts x "
           f"{report['shapes']['gen']['prompt_len']} tokens, greedy, {report['shapes']['gen']['new_tokens']} new "
           "tokens. " + report["shape_note"],
           f"* timing: implementations alternate call by call; median [q1-q3] of {report['reps']['repeat']} steps "
           f"after {report['reps']['warmup']} warm-up steps each ({report['reps']['gen_repeat']} / "
           f"{report['reps']['gen_warmup']} for generate). speedup = PEFT median / ptune_fast median.", ""]
    out += ["## Training step, peak memory, generation", "",
            "| method | shape | PEFT step ms | ptune_fast step ms | **step speedup** | PEFT peak MiB | ptune_fast "
            "peak MiB | peak ratio | PEFT gen tok/s | ptune_fast gen tok/s | gen speedup | loss diff | max logit "
            "diff | generated tokens equal |",
            "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        st, pk, gn, pa = r.get("step"), r.get("peak_bytes"), r.get("generate"), r.get("parity")
        cells = [r["label"], _shape(r)]
        cells += [_ms(st[PEFT]), _ms(st[FAST]), f"**{st[FAST]['speedup_vs_peft']:.2f}x**"] if st else ["-"] * 3
        cells += [_mib(pk[PEFT]), _mib(pk[FAST]), f"{pk[PEFT] / pk[FAST]:.2f}x"] if pk else ["-"] * 3
        cells += ([f"{gn[PEFT]['tokens_per_s']:,.0f}", f"{gn[FAST]['tokens_per_s']:,.0f}", f"{gn['speedup']:.2f}x"]
                  if gn else ["-"] * 3)
        cells += [f"{pa['abs_loss_diff']:.1e}", f"{pa['max_abs_logit_diff']:.1e}"] if pa else ["-"] * 2
        cells += [f"{gn['generated_tokens_equal']}/{gn['generated_tokens']}" if gn else "-"]
        out.append("| " + " | ".join(cells) + " |")
    out += ["", "peak MiB: tensor memory allocated during one step above what was live before it "
            + ("(`torch.cuda.max_memory_allocated` minus the allocation before the step)" if env["device"] == "cuda"
               else "(CPU allocator events of `torch.profiler(profile_memory=True)`)")
            + "; weights, optimizer state and the batch are not counted. Parity (untimed, before any step): loss "
            "diff and max |logit diff| on the real tokens; max |grad diff| of the trainable parameters is in the JSON.",
            ""]
    gcr = [r for r in rows if "step" in r and FAST_GC in r["step"]]
    if gcr:
        out += ["## Prefix tuning with gradient checkpointing", "",
                "ptune_fast with `gradient_checkpointing_enable(gradient_checkpointing_kwargs={'use_reentrant': "
                "False})`, timed in the same interleaved loop as the two above. PEFT refuses: what it raised when tried.",
                "", "| method | PEFT step ms | ptune_fast ms | ptune_fast + GC ms | GC / no GC | PEFT peak MiB | "
                "ptune_fast peak MiB | ptune_fast + GC peak MiB | loss diff GC vs no GC | PEFT + GC |",
                "|---|---:|---:|---:|---:|---:|---:|---:|---:|---|"]
        for r in gcr:
            st, pk = r["step"], r.get("peak_bytes")
            ref = r.get("peft_gc", {})
            out.append(f"| {r['label']} | {_ms(st[PEFT])} | {_ms(st[FAST])} | {_ms(st[FAST_GC])} | "
                       f"{st[FAST_GC]['median_ms'] / st[FAST]['median_ms']:.2f}x | "
                       + (f"{_mib(pk[PEFT])} | {_mib(pk[FAST])} | {_mib(pk[FAST_GC])} | " if pk else "- | - | - | ")
                       + f"{r['parity_gc_vs_no_gc']['abs_loss_diff']:.1e} | `get_peft_model`: "
                       f"{ref.get('get_peft_model_on_checkpointing_base', '-')}; enabled afterwards, a step: "
                       f"{ref.get('checkpointing_enabled_after_get_peft_model', '-')} |")
        out.append("")
    out += ["## Largest batch that fits", ""]
    mb = [r for r in rows if "max_batch" in r]
    if not mb:
        out += ["not run (`--only` without maxbatch)", ""]
    elif isinstance(mb[0]["max_batch"], str):
        out += ["Skipped on CPU: the search needs a device memory cap (`torch.cuda.set_per_process_memory_fraction`, "
                "`max_memory_allocated`); run with `--device cuda`.", ""]
    else:
        out += [f"Training step (same S and virtual tokens as above), doubling from B=1 then bisection to within 1/16, under "
                f"{report['mem_cap_gib']} GiB of allocated memory (weights and optimizer included); search limit "
                f"{report['max_batch_limit']} (`N+`: the limit fit). In parentheses: the smallest B tried that did not fit.", "",
                "| method | PEFT max B | ptune_fast max B | ptune_fast + GC max B | ratio |", "|---|---:|---:|---:|---:|"]
        for r in mb:
            x = r["max_batch"]

            def cell(k):
                if k not in x:
                    return "-"
                y = x[k]
                return f"{y['max_batch']}+" if y["reached_limit"] else f"{y['max_batch']} ({y['first_failing_batch']})"

            ratio = f"{x[FAST]['max_batch'] / x[PEFT]['max_batch']:.2f}x" if x[PEFT]["max_batch"] else "-"
            out.append(f"| {r['label']} | {cell(PEFT)} | {cell(FAST)} | {cell(FAST_GC)} | {ratio} |")
        out.append("")
    bdr = [r for r in rows if "breakdown" in r]
    if bdr:
        clock = bdr[0]["breakdown"][PEFT]["clock"]
        out += ["## Where the time goes", "",
                f"{bdr[0]['breakdown'][PEFT]['sessions']} profiled training steps per side, alternating ({clock}); per "
                "bucket the median over those steps: share of the profiled total and ms. Buckets: "
                "attention = SDPA / `ptune_fast::prefix_attention` ops, fwd + bwd; copies = cat / stack / expand / "
                "repeat / copy_ / clone / casts (the backward of a copy too); encoder = the prompt encoder's forward "
                "and backward; frozen GEMMs = linear / matmul / mm / addmm / bmm of the model; optimizer = AdamW "
                "step + zero_grad; other = the rest (norms, RoPE, activations, loss, embedding, autograd glue). "
                "The profiler adds per-op overhead: compare shares, not totals with the step times above.", "",
                "| method | impl | profiled ms | " + " | ".join(BUCKET_LABEL[b] for b in BUCKETS) + " |",
                "|---|---|---:|" + "---:|" * len(BUCKETS)]
        for r in bdr:
            for k, b in r["breakdown"].items():
                out.append(f"| {SHORT[r['method']]} | {k} | {b['total_ms']:.1f} | "
                           + " | ".join(f"{100 * b['share'][x]:.0f}% ({b['ms'][x]:.1f})" for x in BUCKETS) + " |")
        out.append("")
    gbd = [r for r in rows if "breakdown" in r.get("generate", {})]
    if gbd:
        gb = [b for b in BUCKETS if b != "optimizer"]
        out += ["Generation, one greedy `generate` call per side, same buckets (no backward, no optimizer):", "",
                "| method | impl | profiled ms | " + " | ".join(BUCKET_LABEL[b] for b in gb) + " |",
                "|---|---|---:|" + "---:|" * len(gb)]
        for r in gbd:
            for k, b in r["generate"]["breakdown"].items():
                out.append(f"| {SHORT[r['method']]} | {k} | {b['total_ms']:.1f} | "
                           + " | ".join(f"{100 * b['share'][x]:.0f}% ({b['ms'][x]:.1f})" for x in gb) + " |")
        out.append("")
    if report["notes"]:
        out += ["## Observations (computed from the numbers above)", ""] + [f"* {n}" for n in report["notes"]] + [""]
    if report.get("plots"):
        out += ["## Plots", ""] + [f"![{os.path.splitext(p)[0]}]({p})" for p in report["plots"]] + [""]
    return "\n".join(out)


def plots(report, out_dir):
    """step_time / peak_memory / speedup / breakdown PNGs; returns their file names."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows, tag, files = report["rows"], report["device_tag"], []
    colors = {PEFT: "#7f7f7f", FAST: "#1f77b4", FAST_GC: "#2ca02c"}

    def bars(key, fname, ylabel, title, value, err=None):
        rs = [r for r in rows if key in r]
        if not rs:
            return
        impls = [k for k in (PEFT, FAST, FAST_GC) if any(k in r[key] for r in rs)]
        fig, ax = plt.subplots(figsize=(9, 4.2))
        w = 0.8 / len(impls)
        for i, k in enumerate(impls):
            xs = [j + (i - (len(impls) - 1) / 2) * w for j, r in enumerate(rs) if k in r[key]]
            vs = [value(r[key][k]) for r in rs if k in r[key]]
            kw = {}
            if err:
                kw["yerr"] = [[value(r[key][k]) - err(r[key][k])[0] for r in rs if k in r[key]],
                              [err(r[key][k])[1] - value(r[key][k]) for r in rs if k in r[key]]]
                kw["capsize"] = 3
            ax.bar(xs, vs, w, label=k, color=colors[k], **kw)
        ax.set_xticks(range(len(rs)))
        ax.set_xticklabels([SHORT[r["method"]] for r in rs])
        ax.set_ylabel(ylabel)
        ax.set_title(title)
        ax.legend()
        fig.tight_layout()
        fig.savefig(os.path.join(out_dir, fname), dpi=120)
        plt.close(fig)
        files.append(fname)

    bars("step", "step_time.png", "ms per training step (median, IQR bars)",
         f"Training step (fwd + bwd + AdamW), {tag}, preset {report['preset']}",
         lambda s: s["median_ms"], lambda s: (s["q1_ms"], s["q3_ms"]))
    bars("peak_bytes", "peak_memory.png", "MiB above the live set", f"Peak memory of one training step, {tag}",
         lambda b: b / 2**20)
    rs = [r for r in rows if "step" in r or "peak_bytes" in r or "generate" in r]
    if rs:
        series = [("training step", lambda r: r["step"][FAST]["speedup_vs_peft"] if "step" in r else None),
                  ("peak memory (PEFT / ptune_fast)",
                   lambda r: r["peak_bytes"][PEFT] / r["peak_bytes"][FAST] if "peak_bytes" in r else None),
                  ("generation tok/s", lambda r: r["generate"]["speedup"] if "generate" in r else None)]
        fig, ax = plt.subplots(figsize=(9, 4.2))
        w = 0.8 / len(series)
        for i, (name, f) in enumerate(series):
            pts = [(j + (i - 1) * w, f(r)) for j, r in enumerate(rs) if f(r) is not None]
            if pts:
                ax.bar([p[0] for p in pts], [p[1] for p in pts], w, label=name)
        ax.axhline(1.0, color="k", lw=0.8, ls="--")
        ax.set_xticks(range(len(rs)))
        ax.set_xticklabels([SHORT[r["method"]] for r in rs])
        ax.set_ylabel("ptune_fast vs PEFT (x, > 1 = better)")
        ax.set_title(f"ptune_fast speedup over PEFT, {tag}, preset {report['preset']}")
        ax.legend()
        fig.tight_layout()
        fig.savefig(os.path.join(out_dir, "speedup.png"), dpi=120)
        plt.close(fig)
        files.append("speedup.png")
    bd = [(r, k) for r in rows if "breakdown" in r for k in r["breakdown"]]
    if bd:
        fig, ax = plt.subplots(figsize=(12, 5))
        short_impl = {PEFT: "PEFT", FAST: "fast", FAST_GC: "fast+GC"}
        labels = [f"{SHORT[r['method']]}\n{short_impl[k]}" for r, k in bd]
        bottom = [0.0] * len(bd)
        for b in BUCKETS:
            vals = [r["breakdown"][k]["ms"][b] for r, k in bd]
            ax.bar(range(len(bd)), vals, 0.7, bottom=bottom, label=BUCKET_LABEL[b])
            bottom = [x + y for x, y in zip(bottom, vals)]
        ax.set_xticks(range(len(bd)))
        ax.set_xticklabels(labels, fontsize=7)
        b0 = bd[0][0]["breakdown"][bd[0][1]]
        ax.set_ylabel(f"ms per training step ({b0['clock']})")
        ax.set_title(f"Where the time goes: one training step, per bucket the median of {b0['sessions']} profiled "
                     f"steps, {tag}, preset {report['preset']}", fontsize=10)
        ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.0, 1.0))
        fig.tight_layout()
        fig.savefig(os.path.join(out_dir, "breakdown.png"), dpi=120)
        plt.close(fig)
        files.append("breakdown.png")
    return files


def rerender(path):
    """Notes, Markdown and plots again from a saved JSON report (the measurements are not touched)."""
    with open(path) as f:
        report = json.load(f)
    report["notes"] = notes(report)
    out_dir = os.path.dirname(os.path.abspath(path))
    report["plots"] = plots(report, out_dir)
    md = render(report)
    with open(os.path.splitext(path)[0] + ".md", "w") as f:
        f.write(md + "\n")
    with open(path, "w") as f:
        json.dump(report, f, indent=1)
    print(md)
    return report
