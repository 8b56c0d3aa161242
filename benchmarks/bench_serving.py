"""Mixed-task request streams: transformers' continuous batching with a TaskBank
(ptune_fast.serving.TaskBatchingManager) vs the same requests served one task at a time by PEFT.

One base model (Llama, random weights), 8 prompt-learning tasks held as 8 adapters of one
PeftModel (3 prefix tuning with projection, 3 P-Tuning v2, 2 prompt tuning; P = 16 virtual
tokens), a stream of requests with random tasks, prompt lengths and output lengths, all arriving
at t = 0, greedy decoding.

* ``cb``:   every request submitted to one TaskBatchingManager (transformers' continuous batching,
  paged cache, mixed-task batches; prompt tasks deep-folded);
* ``peft``: for each task in turn, ``set_adapter(task)`` and one ``generate`` over that task's
  requests (left-padded, batched within the task), each row cut to its own output length.

Measured per side, each in its own subprocess (so that peak RSS is its own): throughput (requested
tokens / wall time), time to first token per request (from t = 0), peak RSS over the RSS after
set-up. Tokens: both sides' greedy tokens are compared request by request (PEFT 0.21.2's own
generate is correct on transformers 5.17, broken for prefix and prompt methods on 5.24, where the
comparison reports it).

    python benchmarks/bench_serving.py [--requests 32] [--repeat 3] [--threads 1] [--out-dir benchmarks/results]
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TASKS = {f"pre{i}": "prefix_proj" for i in range(3)}
TASKS.update({f"v2_{i}": "prefix" for i in range(3)})
TASKS.update({f"prm{i}": "prompt" for i in range(2)})
P = 16
MODEL = dict(hidden_size=256, intermediate_size=688, num_hidden_layers=4, num_attention_heads=8,
             num_key_value_heads=4, vocab_size=1000, max_position_embeddings=512)


def _rss_mib() -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return float("nan")


def _peak_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def stream(n: int, seed: int):
    import random

    rng = random.Random(seed)
    names = list(TASKS)
    out = []
    for _ in range(n):
        L = rng.randint(8, 96)
        out.append(dict(task=rng.choice(names), ids=[rng.randrange(3, MODEL["vocab_size"]) for _ in range(L)],
                        new=rng.randint(8, 32)))
    return out


def build():
    """Task -> PeftModel: the 8 adapters in two PeftModels over the one base model (PEFT cannot hold
    prefix and prompt tuning adapters in one PeftModel; prompt learning leaves the base unchanged)."""
    import peft
    import torch
    import transformers as T

    torch.manual_seed(0)
    base = T.LlamaForCausalLM(T.LlamaConfig(initializer_range=0.05, **MODEL)).eval()
    base.generation_config.eos_token_id = None
    by_type, models = {}, {}
    for i, (name, method) in enumerate(TASKS.items()):
        if method == "prompt":
            cfg = peft.PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=P)
        else:
            cfg = peft.PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=P,
                                          prefix_projection=method == "prefix_proj", encoder_hidden_size=128)
        kind = method == "prompt"
        if kind not in by_type:
            by_type[kind] = peft.get_peft_model(base, cfg, adapter_name=name)
        else:
            by_type[kind].add_adapter(name, cfg)
        pm = models[name] = by_type[kind]
        g = torch.Generator().manual_seed(100 + i)
        with torch.no_grad():
            for p in pm.prompt_encoder[name].parameters():
                p.copy_(torch.randn(p.shape, generator=g) * 0.3)
    for m in by_type.values():
        m.eval()
    return models


def run_cb(reqs, repeat, cb_kwargs):
    import transformers as T
    from transformers import GenerationConfig

    from ptune_fast import TaskBank
    from ptune_fast.io import adapter_from_peft
    from ptune_fast.serving import TaskBatchingManager

    pms = build()
    rss0 = _rss_mib()  # model + adapters built: what follows (paged cache, activations) is serving memory
    base = pms[next(iter(TASKS))].get_base_model()
    bank = TaskBank(base, {n: adapter_from_peft(pms[n], adapter_name=n) for n in TASKS})
    del pms  # the bank holds the base model and copies of the adapters; PEFT's wrappers are dropped
    page = "page_size" if hasattr(T.ContinuousBatchingConfig, "page_size") else "block_size"
    mgr = TaskBatchingManager.from_bank(bank, generation_config=GenerationConfig(do_sample=False, eos_token_id=-1),
                                        **{page: 32}, **cb_kwargs)
    runs, tokens = [], None
    with mgr:
        mgr.generate([r["ids"] for r in reqs[:4]], [r["task"] for r in reqs[:4]], max_new_tokens=4)  # warm-up
        for _ in range(repeat):
            mgr.stats = {k: 0 for k in mgr.stats}
            t0 = time.perf_counter()
            ids = [mgr.add_request(r["ids"], r["task"], max_new_tokens=r["new"], record_timestamps=True) for r in reqs]
            outs = mgr.wait(ids)
            wall = time.perf_counter() - t0
            ttft = [o.timestamps[0] - t0 for o in outs]
            tokens = [o.generated_tokens for o in outs]
            runs.append(dict(wall_s=wall, ttft_s=ttft, stats=dict(mgr.stats)))
    return dict(runs=runs, tokens=tokens, rss_after_setup_mib=rss0, peak_rss_mib=_peak_mib())


def run_peft(reqs, repeat):
    import torch
    from transformers.generation.streamers import BaseStreamer

    pms = build()
    rss0 = _rss_mib()
    by_task = {}
    for i, r in enumerate(reqs):
        by_task.setdefault(r["task"], []).append(i)

    class First(BaseStreamer):
        def __init__(self):
            self.calls, self.t = 0, None

        def put(self, value):
            self.calls += 1
            if self.calls == 2 and self.t is None:  # the 1st call is the prompt, the 2nd the first new tokens
                self.t = time.perf_counter()

        def end(self):
            pass

    def serve_all():
        t0 = time.perf_counter()
        tokens, ttft = [None] * len(reqs), [None] * len(reqs)
        for task, rows in by_task.items():
            pm = pms[task]
            pm.set_adapter(task)
            S = max(len(reqs[i]["ids"]) for i in rows)
            ids = torch.ones(len(rows), S, dtype=torch.long)
            mask = torch.zeros(len(rows), S, dtype=torch.long)
            for j, i in enumerate(rows):
                L = len(reqs[i]["ids"])
                ids[j, S - L:] = torch.tensor(reqs[i]["ids"])
                mask[j, S - L:] = 1
            st = First()
            out = pm.generate(input_ids=ids, attention_mask=mask, max_new_tokens=max(reqs[i]["new"] for i in rows),
                              do_sample=False, eos_token_id=None, pad_token_id=1, streamer=st)
            for j, i in enumerate(rows):
                tokens[i] = out[j, S:S + reqs[i]["new"]].tolist()
                ttft[i] = st.t - t0
        return time.perf_counter() - t0, ttft, tokens

    with torch.no_grad():
        serve_all()  # warm-up
        runs, tokens = [], None
        for _ in range(repeat):
            wall, ttft, tokens = serve_all()
            runs.append(dict(wall_s=wall, ttft_s=ttft))
        peak = _peak_mib()
        alone = oracle_tokens(pms, reqs)
    return dict(runs=runs, tokens=tokens, alone=alone, rss_after_setup_mib=rss0, peak_rss_mib=peak)


def oracle_tokens(pms, reqs):
    """Each request alone under its task's PEFT semantics (ptune_fast.oracle, untimed)."""
    import torch

    from ptune_fast.integrations.core import backbone_of
    from ptune_fast.oracle import Oracle

    out = []
    for r in reqs:
        pm = pms[r["task"]]
        base = pm.get_base_model()
        method = {"prefix_proj": "prefix_proj", "prefix": "prefix", "prompt": "prompt"}[TASKS[r["task"]]]
        o = Oracle(base, method, pm.prompt_encoder[r["task"]], backbone_of(base), MODEL["num_hidden_layers"],
                   MODEL["num_key_value_heads"])
        t = torch.tensor([r["ids"]])
        out.append(o.greedy(t, torch.ones_like(t), r["new"])[0, t.shape[1]:].tolist())
    return out


def _summary(side, reqs):
    n_tok = sum(r["new"] for r in reqs)
    walls = [r["wall_s"] for r in side["runs"]]
    med = statistics.median(walls)
    best = min(range(len(walls)), key=lambda i: abs(walls[i] - med))
    tt = sorted(side["runs"][best]["ttft_s"])
    return dict(wall_s_median=med, wall_s_min=min(walls), wall_s_max=max(walls), tokens=n_tok,
                tokens_per_s=n_tok / med, ttft_s_mean=statistics.mean(tt), ttft_s_median=statistics.median(tt),
                ttft_s_p90=tt[int(0.9 * (len(tt) - 1))], ttft_s_max=tt[-1],
                peak_rss_over_setup_mib=side["peak_rss_mib"] - side["rss_after_setup_mib"],
                rss_after_setup_mib=side["rss_after_setup_mib"], peak_rss_mib=side["peak_rss_mib"])


def child(args):
    import torch

    torch.set_num_threads(args.threads)
    reqs = stream(args.requests, args.seed)
    if args.side == "cb":
        res = run_cb(reqs, args.repeat, dict(num_blocks=args.num_blocks, max_batch_tokens=args.max_batch_tokens))
    else:
        res = run_peft(reqs, args.repeat)
    with open(args.child_out, "w") as f:
        json.dump(res, f)


def versions():
    import peft
    import torch
    import transformers

    return {"python": platform.python_version(), "torch": torch.__version__, "transformers": transformers.__version__,
            "peft": peft.__version__}


def device_name():
    try:
        with open("/proc/cpuinfo") as f:
            model = next((ln.split(":", 1)[1].strip() for ln in f if ln.startswith("model name")), platform.processor())
    except OSError:
        model = platform.processor()
    return f"CPU: {model} ({os.cpu_count()} cores)"


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--requests", type=int, default=32)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--num-blocks", type=int, default=160)
    ap.add_argument("--max-batch-tokens", type=int, default=256)
    ap.add_argument("--out-dir", default=os.path.join(ROOT, "benchmarks", "results"))
    ap.add_argument("--render", metavar="JSON", help="rewrite the Markdown of a saved result")
    ap.add_argument("--side", choices=["cb", "peft"], help=argparse.SUPPRESS)
    ap.add_argument("--child-out", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.side:
        return child(args)
    if args.render:
        with open(args.render) as f:
            r = json.load(f)
        with open(os.path.splitext(args.render)[0] + ".md", "w") as f:
            f.write(render(r))
        return 0
    import tempfile

    reqs = stream(args.requests, args.seed)
    sides = {}
    with tempfile.TemporaryDirectory() as tmp:
        for side in ("peft", "cb"):
            out = os.path.join(tmp, f"{side}.json")
            cmd = [sys.executable, os.path.abspath(__file__), "--side", side, "--child-out", out,
                   "--requests", str(args.requests), "--repeat", str(args.repeat), "--threads", str(args.threads),
                   "--seed", str(args.seed), "--num-blocks", str(args.num_blocks),
                   "--max-batch-tokens", str(args.max_batch_tokens)]
            subprocess.run(cmd, check=True, cwd=ROOT)
            with open(out) as f:
                sides[side] = json.load(f)
    alone = sides["peft"]["alone"]
    same_cb = sum(a == b for a, b in zip(sides["cb"]["tokens"], alone))
    same_peft = sum(a == b for a, b in zip(sides["peft"]["tokens"], alone))
    summ = {s: _summary(sides[s], reqs) for s in sides}
    date = datetime.date.today().isoformat()
    result = dict(
        suite="serving", date=date, device=device_name(), versions=versions(), threads=args.threads,
        command="python benchmarks/bench_serving.py " + " ".join(a for a in (argv or sys.argv[1:])),
        setup=dict(model=MODEL, tasks=TASKS, num_virtual_tokens=P, requests=args.requests, seed=args.seed,
                   prompt_len="8..96", new_tokens="8..32", arrival="all at t=0", decoding="greedy",
                   cb=dict(num_blocks=args.num_blocks, max_batch_tokens=args.max_batch_tokens, page_size=32),
                   repeat=args.repeat),
        tokens_equal=(f"continuous batching == each request alone (its task's PEFT semantics, ptune_fast.oracle): "
                      f"{same_cb}/{len(reqs)}; PEFT batched per task == alone: {same_peft}/{len(reqs)}"),
        requests=[dict(task=q["task"], prompt_len=len(q["ids"]), new_tokens=q["new"]) for q in reqs],
        summary=summ, cb_stats=sides["cb"]["runs"][-1]["stats"], raw=sides)
    os.makedirs(args.out_dir, exist_ok=True)
    stem = os.path.join(args.out_dir, f"serving-cpu-{date}")
    with open(stem + ".json", "w") as f:
        json.dump(result, f, indent=1)
    with open(stem + ".md", "w") as f:
        f.write(render(result))
    print(render(result))
    return 0


def _mismatch_note(r) -> str:
    p = r["raw"]["peft"]
    bad = sorted({q["task"] for q, a, b in zip(r["requests"], p["tokens"], p["alone"]) if a != b})
    if not bad:
        return ""
    kinds = sorted({TASKS[t] for t in bad})
    return (f" PEFT's batched rows that differ from alone are all of tasks {bad} ({', '.join(kinds)}): PEFT drops "
            "position ids for prompt methods, so a left-padded row's real tokens sit at shifted positions; "
            "continuous batching packs requests without padding")


def render(r) -> str:
    s, c, p = r["summary"], r["summary"]["cb"], r["summary"]["peft"]
    v = r["versions"]
    lines = [
        f"# Serving: mixed-task request stream, continuous batching vs PEFT one task at a time ({r['date']})", "",
        f"Device: {r['device']}, {r['threads']} torch thread(s). Versions: python {v['python']}, torch {v['torch']}, "
        f"transformers {v['transformers']}, peft {v['peft']}.", "",
        f"Command: `{r['command']}`", "",
        f"Setup: Llama (hidden {r['setup']['model']['hidden_size']}, {r['setup']['model']['num_hidden_layers']} layers, "
        f"{r['setup']['model']['num_attention_heads']}/{r['setup']['model']['num_key_value_heads']} heads, vocab "
        f"{r['setup']['model']['vocab_size']}, fp32), 8 tasks (3 prefix tuning + projection, 3 P-Tuning v2, 2 prompt "
        f"tuning; P = {r['setup']['num_virtual_tokens']}), {r['setup']['requests']} requests (random task, prompt "
        f"{r['setup']['prompt_len']} tokens, {r['setup']['new_tokens']} new tokens), all arriving at t = 0, greedy; "
        f"median of {r['setup']['repeat']} runs after a warm-up. Continuous batching: num_blocks "
        f"{r['setup']['cb']['num_blocks']}, page 32, max_batch_tokens {r['setup']['cb']['max_batch_tokens']}.", "",
        f"Tokens: {r['tokens_equal']}.{_mismatch_note(r)}", "",
        "| side | wall s (min-max) | tokens/s | TTFT mean / median / p90 / max s | peak RSS over model + adapters MiB |",
        "|---|---:|---:|---:|---:|",
    ]
    names = {"cb": "TaskBank + transformers continuous batching", "peft": "PEFT, one task at a time (batched per task)"}
    for k in ("peft", "cb"):
        x = s[k]
        lines.append(f"| {names[k]} | {x['wall_s_median']:.2f} ({x['wall_s_min']:.2f}-{x['wall_s_max']:.2f}) | "
                     f"{x['tokens_per_s']:.0f} | {x['ttft_s_mean']:.2f} / {x['ttft_s_median']:.2f} / "
                     f"{x['ttft_s_p90']:.2f} / {x['ttft_s_max']:.2f} | {x['peak_rss_over_setup_mib']:.1f} |")
    lines += ["", f"Throughput ratio (continuous batching / PEFT): {c['tokens_per_s'] / p['tokens_per_s']:.2f}x; "
              f"mean TTFT ratio (PEFT / continuous batching): {p['ttft_s_mean'] / c['ttft_s_mean']:.2f}x.",
              f"Continuous-batching steps in the last run: {r['cb_stats']}.", ""]
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
