"""What the benchmarks measure, as data: models, presets, suites of cases; and the models they build.

A *case* is one dict: ``kind`` (what is timed), ``method`` (the PEFT config), shapes, and
``measure`` (the extra measurements made on it). :func:`expand` turns a suite and a preset into
its cases; ``python -m benchmarks.run --list`` prints them. Kinds:

* ``train`` -- one training step: ``zero_grad``, forward with labels, backward, ``AdamW.step``;
  PEFT vs the same PEFT model deep-copied and ``ptune_fast.patch``-ed. ``B`` rows of ``S`` tokens,
  ``nv`` virtual tokens (P for prefix methods, n for prompt / P-tuning).
* ``prefill`` -- one no-grad forward of prompt tuning: PEFT vs ``patch`` + ``fold`` (deep fold).
* ``generate`` -- greedy ``generate`` of ``B`` prompts of ``S`` tokens, ``new_tokens`` new tokens.
* ``bank`` -- ``tasks`` PEFT prefix-tuning adapters; ``call`` forward or generate over a batch of
  ``tasks * rows`` rows naming different tasks: PEFT task after task (``set_adapter`` + that task's
  rows) vs one :class:`ptune_fast.TaskBank` call.

Extra measurements (``measure``): ``encoder`` (the encoder forward alone), ``memory`` (peak bytes
of a step, bytes saved for backward, prefix bytes by construction), ``attention`` (the attention
op's share of one profiled call), ``profile`` (where the time goes, in buckets), ``gc`` (ptune_fast
with gradient checkpointing, and PEFT's refusal), ``maxbatch`` (largest batch under a memory cap;
GPU), ``sdpa`` (diagnostic: ptune_fast with its attention op swapped for a PEFT-style SDPA path),
``base`` (prefill: the bare model on the real tokens, the floor), ``one_batch`` (bank: PEFT on all
rows under one adapter, what batching alone buys).

Every model is a ``LlamaForCausalLM`` built from its config (random weights, no download).
"""
from __future__ import annotations

import copy

import torch

SEED = 0

MODELS = {
    "smoke": dict(hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, head_dim=16, vocab_size=97, max_position_embeddings=128),
    "small": dict(hidden_size=256, intermediate_size=512, num_hidden_layers=4, num_attention_heads=8,
                  num_key_value_heads=4, head_dim=32, vocab_size=1000, max_position_embeddings=1024),
    # Llama-3.2-1B-like shape (vocab cut to 32000 where the LM head would dominate)
    "1b": dict(hidden_size=2048, intermediate_size=8192, num_hidden_layers=16, num_attention_heads=32,
               num_key_value_heads=8, head_dim=64, vocab_size=32000, max_position_embeddings=4096,
               rope_theta=500000.0),
    "1b-128k": dict(hidden_size=2048, intermediate_size=8192, num_hidden_layers=16, num_attention_heads=32,
                    num_key_value_heads=8, head_dim=64, vocab_size=128256, max_position_embeddings=4096,
                    rope_theta=500000.0, tie_word_embeddings=True),
}

METHODS = ("prefix_proj", "prefix", "ptuning_mlp", "ptuning_lstm", "prompt")
LABEL = {"prefix_proj": "prefix tuning (projection)", "prefix": "P-Tuning v2 (prefix, no projection)",
         "ptuning_mlp": "P-tuning (MLP)", "ptuning_lstm": "P-tuning (LSTM)", "prompt": "prompt tuning"}
SHORT = {"prefix_proj": "prefix+proj", "prefix": "P-Tuning v2", "ptuning_mlp": "P-tuning MLP",
         "ptuning_lstm": "P-tuning LSTM", "prompt": "prompt tuning"}
#: implementation names a row's measurements are keyed by
PEFT, FAST, FAST_GC, DIAG, BASE, ONE_BATCH = ("peft", "ptune_fast", "ptune_fast+gc", "ptune_fast+sdpa", "base",
                                              "peft_one_adapter_one_batch")
PRESETS = ("smoke", "small", "1b")


def is_prefix(method):
    return method.startswith("prefix")


def _train(methods, batches, S, nv, measure, encoder_hidden=None):
    return [dict(kind="train", method=m, B=B, S=S, nv=nv, measure=tuple(measure),
                 encoder_hidden=(encoder_hidden or {}).get(m)) for m in methods for B in batches]


def _e2e(prefix, prompt, gen, measure, gen_measure):
    """e2e: every method; prefix methods at ``prefix`` = (B, S, P), the others at ``prompt`` = (B, S, n)."""
    out = []
    for m in METHODS:
        B, S, nv = prefix if is_prefix(m) else prompt
        out.append(dict(kind="generate", method=m, B=gen[0], S=gen[1], new_tokens=gen[2], nv=nv,
                        measure=tuple(gen_measure)))
        out += _train([m], [B], S, nv, [x for x in measure if x != "gc" or is_prefix(m)])
    return out


def _fold_bank(n, prefill_S, prefill_B, train_S, train_B, enc_hidden, bank, diag):
    d = ("sdpa",) if diag else ()
    out = [dict(kind="prefill", method="prompt", B=B, S=S, nv=n, measure=("attention",) + d + (("base",) if diag else ()))
           for S in prefill_S for B in prefill_B]
    out += _train(("prompt", "ptuning_mlp"), train_B, train_S, n, ("attention",) + d,
                  {"ptuning_mlp": enc_hidden})
    out += [dict(kind="bank", method="prefix", call=c, tasks=bank[0], rows=bank[1], B=bank[0] * bank[1], S=bank[2],
                 nv=bank[3], new_tokens=bank[4], measure=("attention", "one_batch") + d) for c in ("forward", "generate")]
    return out


_TRAIN_STEP = ("encoder", "memory", "attention")
_E2E = ("memory", "gc", "profile", "maxbatch")
#: warm-up and timed calls per kind
_REPS = {"smoke": dict(train=(1, 3), encoder=(1, 3), prefill=(1, 3), generate=(1, 2), bank=(1, 3), profile=1,
                       attention=1),
         "small": dict(train=(2, 15), encoder=(3, 50), prefill=(3, 20), generate=(2, 7), bank=(2, 10), profile=5,
                       attention=3),
         "1b": dict(train=(3, 20), encoder=(3, 50), prefill=(3, 20), generate=(1, 5), bank=(2, 10), profile=3,
                    attention=3)}
_ENC = {"prefix_proj": 512, "ptuning_mlp": 256}  # train_step's encoder_hidden_size (PEFT's default elsewhere)

#: suite -> preset -> (model, dtype, cases)
SUITES = {
    "train_step": {  # the encoder once per step, prefix bytes, memory, attention attribution
        "smoke": ("smoke", "float32", _train(("prefix_proj", "ptuning_mlp"), (1, 2), 8, 3, _TRAIN_STEP, _ENC)),
        "small": ("small", "float32", _train(("prefix_proj", "ptuning_mlp"), (1, 8, 32), 64, 20, _TRAIN_STEP, _ENC)),
        "1b": ("1b", "bfloat16", _train(("prefix_proj", "ptuning_mlp"), (1, 8, 32), 64, 20, _TRAIN_STEP,
                                        {"prefix_proj": 2048, "ptuning_mlp": 2048})),
    },
    "fold_bank": {  # deep fold (prefill), the shared virtual-token pass (train), task banks
        "smoke": ("smoke", "float32", _fold_bank(10, (4, 16), (1, 2), 8, (2, 4), 32, (3, 2, 8, 5, 4), True)),
        "small": ("small", "float32", _fold_bank(100, (16, 512), (1, 8), 128, (8, 32), 256, (8, 4, 64, 20, 16), True)),
        "1b": ("1b-128k", "bfloat16", _fold_bank(100, (16, 512), (1, 8), 128, (8, 32), 2048, (8, 4, 64, 20, 16),
                                                 False)),
    },
    "e2e": {  # every method: step, memory, gradient checkpointing, generation, profile, largest batch
        "smoke": ("smoke", "float32", _e2e((2, 12, 4), (3, 8, 5), (2, 6, 4), _E2E, ("profile",))),
        "small": ("small", "float32", _e2e((4, 512, 128), (16, 128, 100), (4, 32, 32), _E2E, ("profile",))),
        "1b": ("1b", "bfloat16", _e2e((16, 512, 128), (32, 128, 100), (8, 128, 128), _E2E, ("profile",))),
    },
}


def expand(suite, preset):
    """``(model name, dtype name, reps, [case, ...])`` of ``suite`` at ``preset``; every case gets its
    suite and a stable ``id``."""
    if suite not in SUITES:
        raise ValueError(f"suite must be one of {sorted(SUITES)}, got {suite!r}")
    if preset not in SUITES[suite]:
        raise ValueError(f"preset must be one of {list(SUITES[suite])}, got {preset!r}")
    model, dtype, cases = SUITES[suite][preset]
    out = []
    for c in cases:
        c = dict(c, suite=suite)
        c["id"] = case_id(c)
        out.append(c)
    return model, dtype, _REPS[preset], out


def case_id(c):
    if c["kind"] == "bank":
        return f"{c['suite']}-bank-{c['call']}-{c['tasks']}x{c['rows']}-S{c['S']}-P{c['nv']}"
    nv = ("P" if is_prefix(c["method"]) else "n") + str(c["nv"])
    extra = f"-new{c['new_tokens']}" if c["kind"] == "generate" else ""
    return f"{c['suite']}-{c['kind']}-{c['method']}-B{c['B']}-S{c['S']}-{nv}{extra}"


def shape(c):
    """The shape part of a case's label: ``B=4 S=512 P=128`` (bank: tasks x rows)."""
    if c["kind"] == "bank":
        return f"{c['tasks']} tasks x {c['rows']} rows S={c['S']} P={c['nv']}"
    tail = f" +{c['new_tokens']} tok" if c["kind"] == "generate" else ""
    return f"B={c['B']} S={c['S']} {'P' if is_prefix(c['method']) else 'n'}={c['nv']}{tail}"


def label(c):
    """Short human label of a case (tables, plots)."""
    return f"bank {c['call']} {shape(c)}" if c["kind"] == "bank" else f"{SHORT[c['method']]} {shape(c)}"


# ------------------------------------------------------------------------------ models


def llama(model, dev, dtype, gradient_checkpointing=False):
    import transformers

    cfg = transformers.LlamaConfig(**MODELS[model], initializer_range=0.02, attention_dropout=0.0,
                                   bos_token_id=None, eos_token_id=None, pad_token_id=0)
    torch.manual_seed(SEED)
    with torch.device(dev):
        m = transformers.LlamaForCausalLM(cfg)
    m = m.to(dtype)
    if gradient_checkpointing:
        m.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    return m


def peft_config(method, nv, encoder_hidden=None):
    """PEFT's config for ``method``; ``encoder_hidden`` None = PEFT's default (the model's hidden size)."""
    import peft

    kw = dict(task_type="CAUSAL_LM", num_virtual_tokens=nv)
    if encoder_hidden is not None and method != "prompt":
        kw["encoder_hidden_size"] = encoder_hidden
    if method in ("prefix_proj", "prefix"):
        return peft.PrefixTuningConfig(prefix_projection=method == "prefix_proj", **kw)
    if method in ("ptuning_mlp", "ptuning_lstm"):
        return peft.PromptEncoderConfig(encoder_reparameterization_type=method.split("_")[1].upper(), **kw)
    if method == "prompt":
        return peft.PromptTuningConfig(prompt_tuning_init="RANDOM", **kw)
    raise ValueError(f"method must be one of {METHODS}, got {method!r}")


def build_peft(case, model, dev, dtype, gradient_checkpointing=False):
    import peft

    base = llama(model, dev, dtype, gradient_checkpointing)
    torch.manual_seed(SEED + 1)
    return peft.get_peft_model(base, peft_config(case["method"], case["nv"], case.get("encoder_hidden")))


def make_fast(pm, gradient_checkpointing=False, copy_model=True):
    """``ptune_fast.patch`` of a deep copy of ``pm`` (same weights), or of ``pm`` itself."""
    import ptune_fast

    # outputs="real": the S real positions' logits, the layout these benchmarks compare (the default,
    # outputs="peft", also returns the n virtual positions' logits, broadcast)
    fast = ptune_fast.patch(copy.deepcopy(pm) if copy_model else pm, outputs="real")
    if gradient_checkpointing:
        fast.get_base_model().gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    return fast


def make_ids(B, S, vocab, dev, seed=SEED):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(1, vocab, (B, S), generator=g).to(dev)


def max_abs(x):
    return float(x.detach().float().abs().max())


class Trainer:
    """One model + AdamW + a ``B x S`` batch; ``step()`` = zero_grad, forward with labels, backward, AdamW step."""

    def __init__(self, pm, B, S, dev, lr=1e-3):
        self.pm, self.dev = pm.train(), dev
        self.params = [p for p in pm.parameters() if p.requires_grad]
        self.opt = torch.optim.AdamW(self.params, lr=lr)
        self.set_batch(B, S)

    def set_batch(self, B, S):
        self.B = B
        self.ids = make_ids(B, S, self.pm.get_base_model().config.vocab_size, self.dev)
        self.mask = torch.ones_like(self.ids)

    def forward(self):
        return self.pm(input_ids=self.ids, attention_mask=self.mask, labels=self.ids)

    def forward_loss(self):
        return self.forward().loss

    def step(self):
        self.opt.zero_grad(set_to_none=True)
        loss = self.forward().loss
        loss.backward()
        self.opt.step()
        return loss

    def loss_and_grads(self):
        self.opt.zero_grad(set_to_none=True)
        out = self.forward()
        out.loss.backward()
        grads = [p.grad.detach().float().clone() for p in self.params]
        self.opt.zero_grad(set_to_none=True)
        return out, grads

    def encoder(self):
        """The encoder forward alone, autograd on. PEFT: ``get_prompt(B)`` (prefix tuning: the encoder
        on ``B x P`` tokens + the cache; P-tuning: one row, ``repeat``-ed). ptune_fast: prefix tuning:
        the patched state's provider (``P`` rows, split into ``[L, Hkv, P, D]`` K/V); otherwise
        ``ptune_fast.encoders.encode`` of the encoder's ``n`` rows, once."""
        patch = getattr(self.pm, "_ptune_fast_patch", None)
        if patch is None:
            return self.pm.get_prompt(self.B)
        if patch.state is not None and is_prefix_model(self.pm):
            return patch.state.provider()
        from ptune_fast.encoders import encode

        return encode(self.pm.prompt_encoder[self.pm.active_adapter])

    def encoder_calls(self):
        patch = getattr(self.pm, "_ptune_fast_patch", None)
        if patch is None:
            return None
        return (patch.state if patch.state is not None else patch).encoder_calls

    def state_bytes(self):
        """Measured bytes of the patched model's prefix state (keys + values storages), or None."""
        st = getattr(getattr(self.pm, "_ptune_fast_patch", None), "state", None)
        if st is None or st.keys is None:
            return None
        return int(st.keys.untyped_storage().nbytes() + st.values.untyped_storage().nbytes())


def is_prefix_model(pm):
    return pm.peft_config[pm.active_adapter].peft_type.value == "PREFIX_TUNING"


def prefix_bytes(pm, impl, B):
    """K/V bytes of the virtual tokens a training step materializes, computed from shapes, with
    ``X = L*2*Hkv*P*D*elem``: PEFT prefix tuning ``2*B*X`` (encoder output + the prefix rows of the
    cache's per-layer ``torch.cat`` copies); PEFT prompt / P-tuning ``B*X`` (the virtual tokens' rows
    of every row's K/V, one copy: a lower bound); ptune_fast ``X`` (one shared K and V per layer)."""
    cfg, hf = pm.peft_config[pm.active_adapter], pm.get_base_model().config
    elem = next(pm.get_base_model().parameters()).element_size()
    D = getattr(hf, "head_dim", None) or hf.hidden_size // hf.num_attention_heads
    one = hf.num_hidden_layers * 2 * hf.num_key_value_heads * cfg.num_virtual_tokens * D * elem
    if impl != PEFT:
        return one
    return (2 if is_prefix_model(pm) else 1) * B * one


def train_parity(ref_case, case, skip):
    """Untimed, before any step: loss, logits on the real tokens (``skip`` leading virtual positions of
    the reference), gradients of the trainable parameters."""
    ref, gref = ref_case.loss_and_grads()
    got, ggot = case.loss_and_grads()
    rl = ref.logits[:, skip:]
    return {"abs_loss_diff": abs(ref.loss.item() - got.loss.item()), "max_abs_logit": max_abs(rl),
            "max_abs_logit_diff": max_abs(got.logits[:, -rl.shape[1]:] - rl),
            "max_abs_grad": max(max_abs(g) for g in gref),
            "max_abs_grad_diff": max(max_abs(a - b) for a, b in zip(gref, ggot))}


def peft_gc_refusal(case, model, dev, dtype):
    """Try PEFT prefix tuning with gradient checkpointing both ways; record what happened."""
    out = {}
    try:
        build_peft(case, model, dev, dtype, gradient_checkpointing=True)
        out["get_peft_model_on_checkpointing_base"] = "accepted"
    except Exception as exc:  # noqa: BLE001 - recording whatever PEFT raises
        out["get_peft_model_on_checkpointing_base"] = f"{type(exc).__name__}: {exc}"
    pm = build_peft(case, model, dev, dtype)
    pm.get_base_model().gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    try:
        Trainer(pm, min(case["B"], 2), min(case["S"], 16), dev).step()
        out["checkpointing_enabled_after_get_peft_model"] = "ran"
    except Exception as exc:  # noqa: BLE001
        out["checkpointing_enabled_after_get_peft_model"] = f"{type(exc).__name__}: {str(exc)[:200]}"
    return out


def gen_fn(pm, ids, new_tokens):
    mask = torch.ones_like(ids)
    kw = dict(max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False, pad_token_id=0)

    def run():
        with torch.no_grad():
            return pm.generate(input_ids=ids, attention_mask=mask, **kw)[:, -new_tokens:]

    return run


def forward_fn(model, ids, mask):
    def run():
        with torch.no_grad():
            return model(input_ids=ids, attention_mask=mask).logits

    return run


class BankCase:
    """``tasks`` PEFT prefix-tuning adapters (same P) on one PEFT model, and a :class:`ptune_fast.TaskBank`
    of PromptAdapters holding the same encoder weights on its own copy of the base model; a batch of
    ``tasks * rows`` rows interleaving the tasks (0 1 .. T-1 0 1 ..)."""

    def __init__(self, case, model, dev, dtype):
        import peft

        from ptune_fast import PromptAdapter, TaskBank

        self.T, self.R, self.S, self.G, self.P = case["tasks"], case["rows"], case["S"], case["new_tokens"], case["nv"]
        base = llama(model, dev, dtype).eval()
        hf = copy.deepcopy(base)  # the bank's own copy (attaching switches its attention implementation)
        self.names = names = [f"task{i}" for i in range(self.T)]
        torch.manual_seed(SEED + 1)
        cfg = dict(task_type="CAUSAL_LM", num_virtual_tokens=self.P)
        self.pm = peft.get_peft_model(base, peft.PrefixTuningConfig(**cfg), adapter_name=names[0])
        for name in names[1:]:
            self.pm.add_adapter(name, peft.PrefixTuningConfig(**cfg))
        adapters = {}
        for name in names:
            adapters[name] = PromptAdapter.prefix_tuning(hf, self.P)
            adapters[name].encoder.load_state_dict(self.pm.prompt_encoder[name].state_dict(), strict=True)
        self.pm.eval()
        self.bank = TaskBank(hf, adapters).eval()
        self.B = B = self.T * self.R
        self.ids = make_ids(B, self.S, base.config.vocab_size, dev)
        self.mask = torch.ones_like(self.ids)
        self.tasks = [names[i % self.T] for i in range(B)]
        self.rows_of = {t: torch.tensor([i for i in range(B) if self.tasks[i] == t], device=dev) for t in names}
        self.gen_kw = dict(max_new_tokens=self.G, min_new_tokens=self.G, do_sample=False, pad_token_id=0)

    @torch.no_grad()
    def peft_call(self, call):
        """PEFT, task after task: ``set_adapter(task)`` then that task's rows as one batch."""
        outs = {}
        for t in self.names:
            self.pm.set_adapter(t)
            r = self.rows_of[t]
            outs[t] = (self.pm(input_ids=self.ids[r], attention_mask=self.mask[r]).logits if call == "forward"
                       else self.pm.generate(input_ids=self.ids[r], attention_mask=self.mask[r], **self.gen_kw))
        return outs

    @torch.no_grad()
    def bank_call(self, call):
        kw = dict(input_ids=self.ids, attention_mask=self.mask, tasks=self.tasks)
        return self.bank(**kw).logits if call == "forward" else self.bank.generate(**kw, **self.gen_kw)

    @torch.no_grad()
    def peft_one_batch(self, call):
        """Reference, not a mixed-task answer: all rows as one batch under one adapter."""
        self.pm.set_adapter(self.names[0])
        if call == "forward":
            return self.pm(input_ids=self.ids, attention_mask=self.mask).logits
        return self.pm.generate(input_ids=self.ids, attention_mask=self.mask, **self.gen_kw)

    def parity(self):
        """Untimed: the bank's logits and greedy tokens vs PEFT's, task by task."""
        ref, gref = self.peft_call("forward"), self.peft_call("generate")
        got, ggot, S = self.bank_call("forward"), self.bank_call("generate"), self.S
        return {"max_abs_logit_diff": max(max_abs(got[self.rows_of[t]] - ref[t]) for t in self.names),
                "max_abs_logit": max(max_abs(r) for r in ref.values()), "generated_tokens": self.B * self.G,
                "generated_tokens_equal": sum(int((ggot[self.rows_of[t]][:, S:] == gref[t][:, S:]).sum())
                                              for t in self.names)}
