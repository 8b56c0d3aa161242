"""The model zoo: every causal-LM and sequence-classification family of the installed transformers.

For each ``model_type`` of transformers' auto mappings that ``tests/zoo.py`` can build tiny, and
each of the five methods (prefix, prefix + projection, P-tuning MLP, P-tuning LSTM, prompt tuning),
either the patched PEFT model equals the PEFT-free oracle — logits, loss, gradients of the trainable
parameters; for causal LMs also the greedy tokens of a left-padded batch, and beam search against
PEFT where PEFT's generate works — or ``patch()`` refuses the model with
:class:`ptune_fast.UnsupportedModel` naming the feature. Causal families also run a mixed
``TaskBank`` (prefix tuning + deep-folded prompt tuning rows in one batch) against the oracle.

``PTUNE_FAST_ZOO_REPORT=path.json`` writes every outcome (family, head, method -> verified /
refused: why / skipped: why); ``python scripts/zoo_table.py`` renders the README's table from it.
"""
from __future__ import annotations

import copy
import json
import os
import warnings

import pytest
import torch

import ptune_fast
from ptune_fast.integrations.core import backbone_of, describe
from tests import zoo
from ptune_fast.oracle import Oracle
from tests.parity import assert_same, oracle_run, run, unpatched

peft = pytest.importorskip("peft")

METHODS = ("prefix", "prefix_proj", "ptuning_mlp", "ptuning_lstm", "prompt")
N = 3  # virtual tokens
S = 5  # real tokens
OUTCOMES: dict = {}


@pytest.fixture(scope="module", autouse=True)
def _report():
    yield
    path = os.environ.get("PTUNE_FAST_ZOO_REPORT")
    if path:
        import transformers

        data = {"transformers": transformers.__version__, "peft": peft.__version__, "torch": torch.__version__,
                "outcomes": OUTCOMES}
        if os.path.exists(path):  # several pytest processes (heads) append to one report
            old = json.load(open(path))
            if old.get("transformers") == transformers.__version__:
                old["outcomes"].update(OUTCOMES)
                data = old
        with open(path, "w") as f:
            json.dump(data, f, indent=1, sort_keys=True)


def _peft_config(method, task):
    if method in ("prefix", "prefix_proj"):
        return peft.PrefixTuningConfig(task_type=task, num_virtual_tokens=N, prefix_projection=method == "prefix_proj",
                                       encoder_hidden_size=16)
    if method.startswith("ptuning"):
        return peft.PromptEncoderConfig(task_type=task, num_virtual_tokens=N, encoder_hidden_size=16,
                                        encoder_reparameterization_type="MLP" if method == "ptuning_mlp" else "LSTM")
    return peft.PromptTuningConfig(task_type=task, num_virtual_tokens=N, prompt_tuning_init="RANDOM")


class PeftCannotBuild(Exception):
    pass


def _peft_model(base, method, task):
    torch.manual_seed(1)
    try:
        pm = peft.get_peft_model(base, _peft_config(method, task))
    except (ValueError, AttributeError, TypeError, KeyError) as exc:  # PEFT itself cannot serve this family
        raise PeftCannotBuild(f"PEFT's get_peft_model fails: {exc}") from exc
    with torch.no_grad():  # non-trivial encoder weights (PEFT's small inits would hide layout bugs)
        for name, p in pm.named_parameters():
            if p.requires_grad and "prompt_encoder" in name:
                p.copy_(torch.randn_like(p) * 0.3)
    return pm.eval()


def _batch(seq_cls, seed=0):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, zoo.V, (2, S), generator=g)
    mask = torch.ones(2, S, dtype=torch.long)
    mask[1, :2] = 0  # left padding
    ids = ids.masked_fill(mask == 0, 1)
    labels = torch.randint(0, 3, (2,), generator=g) if seq_cls else ids.masked_fill(mask == 0, -100)
    return ids, mask, labels


def _check_method(base, method, head, causal):
    seq_cls = head == "seq_cls"
    task = "SEQ_CLS" if seq_cls else "CAUSAL_LM"
    pm = _peft_model(copy.deepcopy(base), method, task)
    ids, mask, labels = _batch(seq_cls)
    try:
        ptune_fast.patch(pm)
    except ptune_fast.UnsupportedModel as exc:  # a clear refusal at patch time, nothing changed
        assert not ptune_fast.is_patched(pm)
        assert model_type_of(pm) in str(exc)
        return "refused: " + str(exc).split(": ", 1)[-1]
    if method.startswith("prefix") or pm._ptune_fast_patch.shared:
        assert pm.get_base_model().config._attn_implementation == "ptune_fast"
    try:
        got = run(pm, ids, mask, labels)
    except Exception as exc:  # noqa: BLE001 - is it PEFT's own layout that cannot run this family?
        if not (method.startswith("ptuning") or method == "prompt") or pm._ptune_fast_patch.shared:
            raise
        ptune_fast.unpatch(pm)
        try:
            run(pm, ids, mask, labels)
        except Exception as peft_exc:  # noqa: BLE001
            raise PeftCannotBuild(f"PEFT's own forward fails ({type(peft_exc).__name__}: "
                                  f"{str(peft_exc)[:80]})") from exc
        raise
    ref = oracle_run(pm, method, ids, mask, labels, causal_lm=not seq_cls)
    assert_same(got, ref, mask, S, f"{method}: patched vs oracle")
    if seq_cls:
        return "verified"
    if causal is None:  # the attention probe refused the model: causality unknown, nothing to compare
        return "verified (forward, per row; generate not compared: attention not probed)"
    if not causal:  # bidirectional attention: a cached generate is not a full re-run; nothing to compare
        return "verified (forward; generate not compared: bidirectional attention)"
    with torch.no_grad():
        kw = dict(input_ids=ids, attention_mask=mask, max_new_tokens=3, pad_token_id=1, do_sample=False)
        scored = dict(output_scores=True, return_dict_in_generate=True)
        out = pm.generate(**kw, **scored)
        greedy = out.sequences
        beam = pm.generate(**kw, num_beams=2)
        from tests.parity import oracle_for

        orc = oracle_for(pm, method)
        with unpatched(pm):
            want = orc.greedy(ids, mask, 3)
        assert torch.equal(greedy, want), f"{method}: greedy tokens differ from the oracle's"
        ptune_fast.unpatch(pm)
        try:  # PEFT's generate works here if its tokens and every step's scores equal ours (= the oracle's)
            ref = pm.generate(**kw, **scored)
            peft_ok = torch.equal(ref.sequences, want) and all(
                (a - b).abs().max().item() <= 1e-4 * max(1.0, b.abs().max().item())
                for a, b in zip(ref.scores, out.scores))
        except Exception:  # noqa: BLE001 - PEFT itself broken here: the oracle comparison stands
            peft_ok = False
        if peft_ok:
            assert torch.equal(beam, pm.generate(**kw, num_beams=2)), f"{method}: beam search differs from PEFT's"
    return "verified" + ("" if peft_ok else " (PEFT's own generate fails here; vs oracle only)")


def model_type_of(pm):
    return pm.get_base_model().config.model_type


def _check_bank(base):
    """Prefix tuning and deep-folded prompt tuning rows of one batch, each equal to its oracle."""
    hf = copy.deepcopy(base)
    torch.manual_seed(2)
    a = ptune_fast.PromptAdapter.prefix_tuning(hf, N, True, 16)
    b = ptune_fast.PromptAdapter.prompt_tuning(hf, N)
    with torch.no_grad():
        for p in list(a.parameters()) + list(b.parameters()):
            p.normal_(0, 0.3)
    caps = describe(hf)
    oracles = {"a": Oracle(hf, "prefix_proj", copy.deepcopy(a.encoder), backbone_of(hf), caps.num_layers,
                           caps.num_kv_heads),
               "b": Oracle(hf, "prompt", copy.deepcopy(b.encoder))}
    ids, mask, labels = _batch(False)
    with torch.no_grad():
        bank = ptune_fast.TaskBank(hf, {"a": a, "b": b})  # may refuse (UnsupportedModel): before the oracle
        bank.detach()
        want = {t: o.forward(ids, mask).logits[:, -S:] for t, o in oracles.items()}
        bank.attach()
        bank.fold()
        out = bank(input_ids=ids, attention_mask=mask, tasks=["a", "b"]).logits[:, -S:]
    bank.detach()
    for row, t in enumerate(["a", "b"]):
        err = ((out[row] - want[t][row]) * mask[row, :, None]).abs().max().item()
        assert err <= 1e-4, f"TaskBank row {row} (task {t}) differs from its oracle by {err}"


def _family(model_type, head):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        base, why = zoo.tiny_model(model_type, head)
    if base is None:
        OUTCOMES[f"{head}/{model_type}"] = {"skipped": why}
        pytest.skip(f"cannot build a tiny {model_type}: {why}")
    if head == "causal_lm":
        from transformers import GenerationConfig

        # plain greedy / beam semantics for every family (no forced EOS, penalties or length rules
        # from a family's default generation config): what the oracle's greedy loop implements
        base.generation_config = GenerationConfig(bos_token_id=0, eos_token_id=2, pad_token_id=1)
    results = {}
    try:
        caps = describe(base)
        refusal = None
    except ptune_fast.UnsupportedModel as exc:  # prefix paths refused; prompt methods still run per row
        caps, refusal = None, str(exc).split(": ", 1)[-1]
    causal = None if caps is None else caps.causal
    for method in METHODS:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            try:
                results[method] = _check_method(base, method, head, causal)
            except PeftCannotBuild as exc:
                results[method] = f"not applicable: {exc}"
        if refusal is not None and method.startswith("prefix"):
            assert results[method].startswith(("refused", "not applicable")), (method, results[method])
    if head == "causal_lm" and caps is not None and caps.causal:
        try:
            _check_bank(base)
            results["task_bank"] = "verified"
        except ptune_fast.UnsupportedModel as exc:
            results["task_bank"] = "refused: " + str(exc).split(": ", 1)[-1]
    outcome = {"methods": results, "causal": causal, "positions": None if caps is None else caps.positions}
    if not any(r.startswith("verified") for r in results.values()):
        outcome = {"refused": refusal or "; ".join(sorted({r.split(": ", 1)[-1] for r in results.values()}))}
    OUTCOMES[f"{head}/{model_type}"] = outcome


@pytest.mark.parametrize("model_type", zoo.causal_lm_types())
def test_causal_lm_family(model_type):
    _family(model_type, "causal_lm")


@pytest.mark.parametrize("model_type", zoo.seq_cls_types())
def test_seq_cls_family(model_type):
    _family(model_type, "seq_cls")
