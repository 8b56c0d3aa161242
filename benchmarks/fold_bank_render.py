"""The report of :mod:`benchmarks.fold_bank_report`: targets, notes and the Markdown table from the
measured rows.
"""
from __future__ import annotations

METHOD_LABEL = {"prompt": "prompt tuning", "ptuning_mlp": "P-tuning (MLP)", "prefix": "prefix tuning (P-Tuning v2)"}
#: the implementations a row's measurements are keyed by
PEFT, FAST, DIAG = "peft", "ptune_fast", "ptune_fast+sdpa"
ONE_BATCH = "peft_one_adapter_one_batch"  # bank reference: all rows under one adapter


def _ms(s):
    f = "{:.1f}" if s["median_ms"] >= 10 else "{:.2f}"
    return f"{f.format(s['median_ms'])} [{f.format(s['q1_ms'])}-{f.format(s['q3_ms'])}]"


def _share(r, impl):
    p = r[impl].get("profile")
    return f"{100 * p['attention_share']:.0f}%" if p and p["attention_share"] is not None else "-"


def _diag_cells(r):
    if DIAG not in r:
        return ""
    return f" {_ms(r[DIAG])} | {r[DIAG]['speedup_vs_peft']:.2f}x |"


def render(report):
    env, m, rows = report["env"], report["model"], report["rows"]
    diag = report["sdpa_diagnostic"]
    dh = " ptune_fast+SDPA ms (diagnostic) | its speedup |" if diag else ""
    dd = "---:|---:|" if diag else ""
    out = [
        f"# Fold, shared pass and task bank: PEFT vs ptune_fast ({env['device']}, preset `{report['preset']}`)", "",
        f"* device: {env['device']} -- {env.get('gpu') or env['cpu']} ({env['cpu_count']} logical CPUs, torch "
        f"threads {env['torch_threads']}); load average (1 min) before / after: {report['loadavg_before']} / "
        f"{report['loadavg_after']}",
        f"* versions: torch {env['torch']}, transformers {env['transformers']}, peft {env['peft']}, ptune_fast "
        f"{env['ptune_fast']} (git {env['git_commit']}"
        + (f"; {env['git_commit_at_end']} by the end of the run" if env.get("git_commit_at_end") else "")
        + f"), python {env['python']}; PTUNE_FAST_BACKEND={env['backend_env']}",
        f"* date: {env['date']}",
        "* ptune_fast backends that served the calls (whole run, diagnostics excluded): "
        + (", ".join(f"`{k}`: {v}" for k, v in report.get("backend_calls", {}).items()) or "-"),
        f"* command: `{report['command']}` -- wall time {report['wall_s']:.0f} s",
        f"* model: LlamaForCausalLM from its config, random weights: hidden {m['hidden_size']}, "
        f"{m['num_hidden_layers']} layers, {m['num_attention_heads']} heads, {m['num_key_value_heads']} KV heads "
        f"(head_dim {m['head_dim']}), intermediate {m['intermediate_size']}, vocab {m['vocab_size']}; "
        f"{report['dtype']}; eval mode (training: train mode, Llama has no dropout); PEFT's attention: "
        f"`{report['peft_attn_implementation']}`",
        f"* timing: the implementations alternate call by call (ABC, CBA, ...); median [q1-q3] ms of "
        f"{report['repeat']['prefill']} / {report['repeat']['train']} / {report['repeat']['bank']} calls "
        f"(prefill / train / bank) after {report['warmup']['prefill']} / {report['warmup']['train']} / "
        f"{report['warmup']['bank']} warm-up calls. speedup = PEFT median / ptune_fast median = throughput ratio. "
        "tok/s counts real tokens only (B*S; generate: B*new tokens). attention share: attention op (fwd+bwd) / "
        "total, one profiled call.", ""]
    pre = [r for r in rows if r["case"] == "prefill"]
    if pre:
        out += ["## 1. Prefill: deep-folded prompt tuning vs PEFT prompt tuning", "",
                "One no-grad forward, full logits. PEFT: `PromptTuningConfig(num_virtual_tokens=n)`. ptune_fast: "
                "that model deep-copied, `ptune_fast.patch(pm)` + `ptune_fast.fold(pm)`."
                + (" base: the bare base model on the S real tokens (no virtual tokens), the floor." if diag else ""),
                "", "| n | S | B | tokens through model PEFT / ptune_fast | PEFT ms | ptune_fast ms | PEFT tok/s | "
                "ptune_fast tok/s | **speedup** | attention share PEFT / ptune_fast |" + dh
                + (" base ms |" if diag else "") + " max abs logit diff |",
                "|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|" + dd + ("---:|" if diag else "") + "---:|"]
        for r in pre:
            t = r["tokens_through_model"]
            out.append(f"| {r['n']} | {r['S']} | {r['B']} | {t[PEFT]} / {t[FAST]} | {_ms(r[PEFT])} | {_ms(r[FAST])} "
                       f"| {r[PEFT]['tokens_per_s']:,.0f} | {r[FAST]['tokens_per_s']:,.0f} | **{r['speedup']:.2f}x** "
                       f"| {_share(r, PEFT)} / {_share(r, FAST)} |" + _diag_cells(r)
                       + (f" {_ms(r['base'])} |" if diag else "") + f" {r['max_abs_logit_diff']:.1e} |")
        out.append("")
    tr = [r for r in rows if r["case"] == "train"]
    if tr:
        out += ["## 2. Training step: shared virtual-token pass vs PEFT", "",
                "forward + backward + `AdamW.step()`. PEFT model vs that model deep-copied and `ptune_fast.patch(pm)`-ed "
                "(default prompt_pass: shared). Agreement measured before the first step.", "",
                "| method | n | S | B | tokens through model PEFT / ptune_fast | PEFT ms | ptune_fast ms | PEFT tok/s "
                "| ptune_fast tok/s | **speedup** | attention share PEFT / ptune_fast |" + dh
                + " max abs logit diff | loss diff | max abs grad diff |",
                "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|" + dd + "---:|---:|---:|"]
        for r in tr:
            t = r["tokens_through_model"]
            out.append(f"| {METHOD_LABEL[r['method']]} | {r['n']} | {r['S']} | {r['B']} | {t[PEFT]} / {t[FAST]} | "
                       f"{_ms(r[PEFT])} | {_ms(r[FAST])} | {r[PEFT]['tokens_per_s']:,.0f} | "
                       f"{r[FAST]['tokens_per_s']:,.0f} | **{r['speedup']:.2f}x** | {_share(r, PEFT)} / "
                       f"{_share(r, FAST)} |" + _diag_cells(r) + f" {r['max_abs_logit_diff']:.1e} | "
                       f"{r['abs_loss_diff']:.1e} | {r['max_abs_grad_diff']:.1e} (max grad {r['max_abs_grad']:.1e}) |")
        out.append("")
    bk = [r for r in rows if r["case"] == "bank"]
    if bk:
        r0 = bk[0]
        out += ["## 3. Mixed-task batch: one TaskBank call vs PEFT task after task", "",
                f"{r0['tasks']} PEFT prefix-tuning adapters (`PrefixTuningConfig(num_virtual_tokens={r0['P']})`, "
                f"no projection) on one base model; {r0['rows_per_task']} rows per task (B = {r0['B']}), S = "
                f"{r0['S']}, the rows interleave the tasks. PEFT: per task `set_adapter(task)`, then its rows as one "
                "batch. ptune_fast: `TaskBank(hf, {task: PromptAdapter})` holding the same encoder weights, one call "
                f"with `tasks=[...]` per row. generate: greedy, {bk[-1]['new_tokens']} new tokens per row.", "",
                "| call | PEFT sequential ms | TaskBank ms | PEFT tok/s | TaskBank tok/s | **throughput ratio** | "
                "attention share PEFT / TaskBank |" + dh + " PEFT, all rows in one batch, one adapter (reference) ms "
                "| its speedup |", "|---|---:|---:|---:|---:|---:|---:|" + dd + "---:|---:|"]
        for r in bk:
            out.append(f"| {r['call']} | {_ms(r[PEFT])} | {_ms(r[FAST])} | {r[PEFT]['tokens_per_s']:,.0f} | "
                       f"{r[FAST]['tokens_per_s']:,.0f} | **{r['speedup']:.2f}x** | {_share(r, PEFT)} / "
                       f"{_share(r, FAST)} |" + _diag_cells(r) + f" {_ms(r[ONE_BATCH])} | "
                       f"{r[ONE_BATCH]['speedup_vs_peft']:.2f}x |")
        out += ["", f"Agreement (untimed): max abs logit diff {r0['max_abs_logit_diff']:.1e} (logits up to "
                f"{r0['max_abs_logit']:.1f}); greedy generate: {r0['tasks_generating_identical_tokens']}/{r0['tasks']} "
                f"tasks give identical sequences, {r0['generated_tokens_equal']}/{r0['generated_tokens']} generated "
                "tokens equal.", ""]
    out += ["## Targets", ""] + [f"* {t}" for t in report["targets"]] + [""]
    if report["notes"]:
        out += ["## Where the time goes", ""] + [f"* {n}" for n in report["notes"]] + [""]
    return "\n".join(out)


def _why(r):
    """Short measured reasons for a missed target."""
    why = []
    if "base" in r:
        why.append(f"the bare base model on the real tokens alone is only {r['base']['speedup_vs_peft']:.2f}x faster "
                   "than PEFT here (ceiling)")
    if ONE_BATCH in r:
        why.append(f"PEFT on all rows as one batch, one adapter, is only {r[ONE_BATCH]['speedup_vs_peft']:.2f}x faster "
                   "than task after task (what batching alone buys here)")
    pf = r[FAST].get("profile")
    if pf and pf["attention_share"] is not None:
        why.append(f"the attention op takes {100 * pf['attention_share']:.0f}% of ptune_fast's profiled time")
    if DIAG in r:
        why.append(f"with SDPA attention (diagnostic) {r[DIAG]['speedup_vs_peft']:.2f}x")
    return "; ".join(why)


def targets(rows):
    res = []

    def line(text, r, goal):
        ok = r["speedup"] >= goal
        res.append(f"{text}: {r['speedup']:.2f}x (target >= {goal}x): **{'met' if ok else 'MISSED'}**"
                   + ("" if ok else f" -- {_why(r)}"))

    pre = [r for r in rows if r["case"] == "prefill"]
    for r in pre:
        if r["S"] == min(x["S"] for x in pre):
            line(f"prefill, folded vs PEFT, n={r['n']}, S={r['S']}, B={r['B']}", r, 3)
    tr = [r for r in rows if r["case"] == "train"]
    for r in tr:
        if r["B"] == max(x["B"] for x in tr):
            line(f"training throughput, {METHOD_LABEL[r['method']]}, n={r['n']}, S={r['S']}, B={r['B']}", r, 1.5)
    for r in rows:
        if r["case"] == "bank":
            line(f"mixed-task {r['call']}, TaskBank vs sequential PEFT", r, 2)
    return res


def notes(report):
    """Plain statements computed from the measured rows."""
    rows, out = report["rows"], []
    calls = report.get("backend_calls", {})
    served = {k.split(" -> ")[1]: v for k, v in calls.items() if k.startswith("prefix_attention -> ")}
    main_backend = max(served, key=served.get) if served else None
    if main_backend == "reference":
        out.append("ptune_fast's `prefix_attention` ran its pure-PyTorch reference backend (fp32 score matrix "
                   "materialized, masked, logsumexp, exp, two matmuls; backward = recompute + `torch.func.vjp`), "
                   "while PEFT's Llama calls torch's fused SDPA. The fused Triton/CUDA kernels run on GPU only.")
    elif main_backend == "sdpa":
        out.append("ptune_fast's `prefix_attention` ran its `sdpa` backend (the prefix broadcast and concatenated "
                   "onto K/V inside the call, then torch's fused SDPA, native autograd): the same attention kernel "
                   "PEFT's Llama calls, so the ptune_fast+SDPA diagnostic column measures nearly the same path.")
    for r in rows:
        pp, pf = r[PEFT].get("profile"), r[FAST].get("profile")
        label = (f"prefill S={r['S']} B={r['B']}" if r["case"] == "prefill" else f"bank {r['call']}"
                 if r["case"] == "bank" else f"train {METHOD_LABEL[r['method']]} B={r['B']}")
        s = f"{label}: {r['speedup']:.2f}x."
        if pp and pf:
            s += (f" The attention op{' (fwd+bwd)' if r['case'] == 'train' else ''} is "
                  f"{100 * pf['attention_share']:.0f}% of ptune_fast's profiled time ({pf['attention_ms']:.0f} of "
                  f"{pf['total_ms']:.0f} ms) vs {100 * pp['attention_share']:.0f}% of PEFT's ({pp['attention_ms']:.0f} "
                  f"of {pp['total_ms']:.0f} ms)")
            rest_p, rest_f = pp["total_ms"] - pp["attention_ms"], pf["total_ms"] - pf["attention_ms"]
            if r["case"] != "prefill" and rest_f > 0:
                s += f"; outside it, PEFT time / ptune_fast time = {rest_p / rest_f:.2f}"
            s += "."
        if "tokens_through_model" in r:
            t = r["tokens_through_model"]
            s += f" ptune_fast pushes {t[PEFT] / t[FAST]:.2f}x fewer tokens through the model."
        if DIAG in r:
            s += f" With SDPA attention instead (diagnostic) the speedup is {r[DIAG]['speedup_vs_peft']:.2f}x."
        if "base" in r:
            s += (f" The bare base model on the {r['B'] * r['S']} real tokens alone takes {r['base']['median_ms']:.2f} ms "
                  f"(PEFT {r[PEFT]['median_ms']:.2f} ms): no prompt method can beat PEFT by more than "
                  f"{r['base']['speedup_vs_peft']:.2f}x here.")
        if ONE_BATCH in r:
            s += (f" PEFT running all {r['B']} rows as ONE batch under one adapter (not a mixed-task answer; what "
                  f"batching alone buys) is {r[ONE_BATCH]['speedup_vs_peft']:.2f}x faster than task after task.")
        out.append(s)
    return out
