"""PEFT workflows behave exactly as before patch() (issue 10 items 1-8), checked against the
PEFT-free oracle (and PEFT's own behaviour where it is the specification, e.g. disable_adapter)."""
import copy

import pytest
import torch

import ptune_fast
from tests.models import batch, peft_model, tiny_model
from tests.parity import assert_grad_close, assert_same, oracle_for, oracle_run, run, unpatched

peft = pytest.importorskip("peft")
S = 7


@pytest.mark.parametrize("method", ["prompt", "ptuning_mlp"])
def test_gradient_checkpointing_with_the_shared_pass(method):
    pm = peft_model("llama", method)
    ids, mask, labels = batch("llama", 3, S, "left")
    ptune_fast.patch(pm)
    pm.train()
    pm.get_base_model().gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    got = run(pm, ids, mask, labels)
    pm.get_base_model().gradient_checkpointing_disable()
    assert_same(got, oracle_run(pm, method, ids, mask, labels), mask, S, "checkpointed vs oracle")


@pytest.mark.parametrize("method", ["prompt", "prefix_proj"])
def test_num_items_in_batch_gives_hf_trainer_loss(method):
    """HF Trainer passes num_items_in_batch (label tokens of the whole accumulated batch)."""
    pm = peft_model("llama", method)
    ids, mask, labels = batch("llama", 3, S, "left")
    ptune_fast.patch(pm)
    n_items = torch.tensor(41)
    got = run(pm, ids, mask, labels, num_items_in_batch=n_items)
    orc = oracle_for(pm, method)
    with unpatched(pm):
        pm.zero_grad(set_to_none=True)
        out = orc.forward(ids, mask, labels, num_items_in_batch=n_items)
        out.loss.backward()
        grads = {n: p.grad.clone() for n, p in pm.named_parameters() if p.requires_grad and p.grad is not None}
        plain = orc.forward(ids, mask, labels).loss
    assert abs(out.loss.item() - plain.item()) > 1e-3, "num_items_in_batch must change the reference loss"
    assert abs(got[1].item() - out.loss.item()) <= 1e-5
    for n in grads:
        assert_grad_close(got[2][n], grads[n], n)


@pytest.mark.parametrize("method", ["prefix", "prompt", "ptuning_lstm"])
def test_disable_adapter_gives_the_base_model(method):
    pm = peft_model("llama", method)
    ids, mask, _ = batch("llama", 2, S, "left")
    base = tiny_model("llama")  # the same weights (same seed) without any adapter
    kw = dict(input_ids=ids, attention_mask=mask, max_new_tokens=4, do_sample=False, pad_token_id=1)
    with torch.no_grad():
        want = base(input_ids=ids, attention_mask=mask).logits
        want_gen = base.generate(**kw)
        ptune_fast.patch(pm)
        with pm.disable_adapter():
            got = pm(input_ids=ids, attention_mask=mask).logits
            got_gen = pm.generate(**kw)
        after = pm(input_ids=ids, attention_mask=mask).logits
    assert ((got - want) * mask[:, :, None]).abs().max().item() <= 1e-5
    assert torch.equal(got_gen, want_gen)
    assert ((after[:, -S:] - want) * mask[:, :, None]).abs().max().item() > 1e-3, "adapter back on after the block"


def test_generate_after_set_adapter_raises_instead_of_using_the_old_adapter():
    pm = peft_model("llama", "prefix")
    pm.add_adapter("b", peft.PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=5))
    ptune_fast.patch(pm)
    pm.set_adapter("b")
    ids, mask, _ = batch("llama", 2, S, "left")
    with pytest.raises(ValueError, match="active PEFT adapter changed from 'default' to 'b'"):
        pm.generate(input_ids=ids, attention_mask=mask, max_new_tokens=2, pad_token_id=1)


@pytest.mark.parametrize("method", ["prefix_proj", "ptuning_mlp"])
def test_weights_changed_in_place_and_deepcopy_are_seen(method):
    """No stale prefix after p.data.mul_ (EMA) or load_state_dict; a deepcopy owns its encoder."""
    pm = peft_model("llama", method)
    ids, mask, labels = batch("llama", 2, S, "left")
    ptune_fast.patch(pm)
    with torch.no_grad():
        pm(input_ids=ids, attention_mask=mask)
        for p in pm.prompt_encoder["default"].parameters():
            p.data.mul_(0.5)  # does not bump the parameters' version counters
        got = pm(input_ids=ids, attention_mask=mask).logits
        orc = oracle_for(pm, method)
        with unpatched(pm):
            want = orc.forward(ids, mask).logits
        assert ((got[:, -S:] - want[:, -S:]) * mask[:, :, None]).abs().max().item() <= 1e-5
        twin = copy.deepcopy(pm)
        for p in twin.prompt_encoder["default"].parameters():
            p.data.normal_()
        mine, theirs = pm(input_ids=ids, attention_mask=mask).logits, twin(input_ids=ids, attention_mask=mask).logits
        assert torch.equal(mine, got), "the original must not see the copy's weights"
        orc_twin = oracle_for(twin, method)
        with unpatched(twin):
            want_twin = orc_twin.forward(ids, mask).logits
        assert ((theirs[:, -S:] - want_twin[:, -S:]) * mask[:, :, None]).abs().max().item() <= 1e-5


def test_compiled_model_compiles_once_and_sees_weight_changes():
    import torch._dynamo as dynamo

    pm = peft_model("llama", "prefix_proj")
    ptune_fast.patch(pm)
    hf = pm.get_base_model()
    dynamo.reset()
    compiled = torch.compile(hf, backend="aot_eager")
    ids, mask, labels = batch("llama", 2, S, "left")
    compiled(input_ids=ids, attention_mask=mask, labels=labels).loss.backward()  # one graph for training,
    with torch.no_grad():
        compiled(input_ids=ids, attention_mask=mask, labels=labels)  # one for no-grad (grad mode is a guard)
    with dynamo.config.patch(error_on_recompile=True):
        for step in range(3):
            pm.zero_grad(set_to_none=True)
            compiled(input_ids=ids, attention_mask=mask, labels=labels).loss.backward()
            with torch.no_grad():
                for p in pm.prompt_encoder["default"].parameters():
                    p.add_(0.1)
                got = compiled(input_ids=ids, attention_mask=mask, labels=labels).logits
    with torch.no_grad():
        eager = hf(input_ids=ids, attention_mask=mask, labels=labels).logits
    assert (got - eager).abs().max().item() <= 1e-5, "compiled no-grad inference served stale weights"
    dynamo.reset()


@pytest.mark.parametrize("method", ["prompt", "ptuning_lstm"])
def test_shared_pass_returns_peft_shapes_by_default(method):
    n = 5
    pm = peft_model("llama", method, n=n)
    ids, mask, labels = batch("llama", 3, S, "left")
    ptune_fast.patch(pm)
    with torch.no_grad():
        got = pm(input_ids=ids, attention_mask=mask, labels=labels)
        orc = oracle_for(pm, method)
        with unpatched(pm):
            want = orc.forward(ids, mask, labels)
        peft_out = pm.__class__.forward(pm, input_ids=ids, attention_mask=mask, labels=labels)  # PEFT's own
    assert got.logits.shape == want.logits.shape == (3, n + S, tiny_model("llama").config.vocab_size)
    assert peft_out.logits.shape == got.logits.shape
    full = torch.cat([torch.ones(3, n, dtype=mask.dtype), mask], 1)[:, :, None]
    assert ((got.logits - want.logits) * full).abs().max().item() <= 1e-5
    assert abs(got.loss.item() - want.loss.item()) <= 1e-5
    ptune_fast.unpatch(pm)
    ptune_fast.patch(pm, outputs="real")
    with torch.no_grad():
        assert pm(input_ids=ids, attention_mask=mask).logits.shape[1] == S
    with pytest.raises(ValueError, match="outputs must be 'peft'"):
        ptune_fast.patch(peft_model("llama", method), outputs="all")


def test_static_cache_is_refused_clearly():
    pm = peft_model("llama", "prefix")
    ptune_fast.patch(pm)
    ids, mask, _ = batch("llama", 2, S, "left")
    with pytest.raises(NotImplementedError, match="cache_implementation='static'"):
        pm.generate(input_ids=ids, attention_mask=mask, max_new_tokens=2, pad_token_id=1,
                    cache_implementation="static")


@pytest.mark.parametrize("method", ["prefix_proj", "ptuning_mlp", "ptuning_lstm"])
def test_float64_encoders_compute_in_float64(method):
    """model.to(torch.float64): the projection / P-tuning encoders compute in fp64 (torch's own
    modules in fp64 are the reference), and the patched model equals the fp64 oracle."""
    from ptune_fast.encoders import encode

    pm = peft_model("llama", method).to(torch.float64)
    enc = pm.prompt_encoder["default"]
    with torch.no_grad():
        x = enc.embedding.weight
        if method == "prefix_proj":
            want = enc.transform(x)
        elif method == "ptuning_mlp":
            want = enc.mlp_head(x)
        else:
            want = enc.mlp_head(enc.lstm_head(x.unsqueeze(0))[0].squeeze(0))
        got = encode(enc)
    assert got.dtype == torch.float64 and (got - want).abs().max().item() <= 1e-12
    ids, mask, labels = batch("llama", 2, S, "left")
    ptune_fast.patch(pm)
    assert_same(run(pm, ids, mask, labels), oracle_run(pm, method, ids, mask, labels), mask, S, "fp64")


@pytest.mark.parametrize("method", ["prompt", "prefix_proj"])
def test_patched_model_called_from_two_threads(method):
    """Calls from two threads on one patched model are serialised: every result equals the
    single-threaded one (the shared pass's state would otherwise be seen half-built)."""
    import threading

    pm = peft_model("llama", method)
    ptune_fast.patch(pm)
    inputs = [batch("llama", 2, S, "left", seed=s)[:2] for s in range(2)]
    with torch.no_grad():
        want = [pm(input_ids=i, attention_mask=m).logits for i, m in inputs]
    bad = []

    def work(k):
        with torch.no_grad():
            for _ in range(15):
                got = pm(input_ids=inputs[k][0], attention_mask=inputs[k][1]).logits
                # not bitwise: a new thread's OpenMP team has its own thread count, so reductions
                # may round differently (measured 3.8e-6); a state race is O(1) (missing prefix)
                if (got - want[k]).abs().max().item() > 1e-4:
                    bad.append(k)

    threads = [threading.Thread(target=work, args=(k,)) for k in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not bad, f"{len(bad)} of 30 calls got another call's state"


def test_mask_errors_name_attention_mask():
    pm = peft_model("llama", "prefix")
    ptune_fast.patch(pm)
    ids, _, _ = batch("llama", 2, S, "none")
    with pytest.raises(ValueError, match="attention_mask") as err:
        pm(input_ids=ids, attention_mask=torch.ones(1, S, dtype=torch.bool))  # one row for a batch of two
    assert "key_padding_mask" not in str(err.value)


def test_no_future_warning_from_our_code_paths():
    """transformers >= 5.24 warns when a forward gets ``past_key_values``: ptune_fast passes the cache
    under the name the installed forward takes (integrations/compat.py)."""
    import warnings

    models = {m: peft_model("llama", m) for m in ("prefix_proj", "prompt", "ptuning_lstm")}  # PEFT's own warnings
    bank_base = tiny_model("qwen2")
    ids, mask, labels = batch("llama", 2, S, "left")
    with warnings.catch_warnings():
        warnings.simplefilter("error", FutureWarning)
        for pm in models.values():
            ptune_fast.patch(pm)
            pm(input_ids=ids, attention_mask=mask, labels=labels).loss.backward()
            with torch.no_grad():
                pm.generate(input_ids=ids, attention_mask=mask, max_new_tokens=3, pad_token_id=1, num_beams=2)
        bank = ptune_fast.prompt_tuning(bank_base, 4)
        bank(input_ids=ids, attention_mask=mask, labels=labels).loss.backward()
        with torch.no_grad():
            bank.generate(input_ids=ids, attention_mask=mask, max_new_tokens=3, pad_token_id=1)
