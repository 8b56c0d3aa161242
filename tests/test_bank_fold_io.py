"""TaskBank, standalone constructors, folding and adapter files, checked against PEFT."""
import os

import pytest
import torch

import ptune_fast
from ptune_fast import PromptAdapter, TaskBank
from tests.models import batch, peft_model, tiny_model

pytest.importorskip("peft")

def _peft_encoder_into(adapter, pm):
    sd = pm.prompt_encoder["default"].state_dict()
    adapter.encoder.load_state_dict(sd, strict=True)  # PEFT's parameter names and shapes load as they are
    return adapter


@pytest.mark.parametrize("method,kind", [("prefix", "llama"), ("prefix_proj", "qwen2"), ("ptuning_mlp", "gpt2"),
                                         ("ptuning_lstm", "llama"), ("prompt", "opt")])
def test_standalone_equals_peft(method, kind):
    pm = peft_model(kind, method)
    ids, mask, labels = batch(kind, 3, 8, "left")
    ref = pm(input_ids=ids, attention_mask=mask, labels=labels)
    hf = tiny_model(kind)
    if method.startswith("prefix"):
        ad = PromptAdapter.prefix_tuning(hf, 5, method == "prefix_proj", 32)
    elif method.startswith("ptuning"):
        ad = PromptAdapter.p_tuning(hf, 5, "MLP" if method == "ptuning_mlp" else "LSTM", 32)
    else:
        ad = PromptAdapter.prompt_tuning(hf, 5)
    bank = TaskBank(hf, {"t": _peft_encoder_into(ad, pm)})
    got = bank(input_ids=ids, attention_mask=mask, labels=labels)
    rl = ref.logits[:, -8:] if ref.logits.shape[1] > 8 else ref.logits
    assert ((got.logits - rl) * mask[:, :, None]).abs().max().item() <= 1e-5
    assert abs(got.loss.item() - ref.loss.item()) <= 1e-5
    got.loss.backward()
    assert all(p.grad is not None for p in bank.tasks["t"].parameters())


def _three_task_bank(hf):
    torch.manual_seed(5)
    return {"pre": PromptAdapter.prefix_tuning(hf, 4, True, 16), "v2": PromptAdapter.prefix_tuning(hf, 4),
            "pt": PromptAdapter.p_tuning(hf, 4, "LSTM", 16), "prm": PromptAdapter.prompt_tuning(hf, 4)}


def test_mixed_bank_equals_each_task_alone():
    hf = tiny_model("llama")
    adapters = _three_task_bank(hf)
    names = ["pre", "v2", "pt", "prm"]
    ids, mask, labels = batch("llama", 4, 7, "left")
    bank = TaskBank(hf, adapters)
    out = bank(input_ids=ids, attention_mask=mask, labels=labels, tasks=names)
    with torch.no_grad():
        gen = bank.generate(input_ids=ids, attention_mask=mask, max_new_tokens=4, do_sample=False, pad_token_id=1,
                            tasks=names)
        beam = bank.generate(input_ids=ids, attention_mask=mask, max_new_tokens=4, num_beams=2, do_sample=False,
                             pad_token_id=1, tasks=names)
    bank.detach()
    losses = []
    for row, name in enumerate(names):
        single = TaskBank(hf, {name: adapters[name]})
        r = single(input_ids=ids[row:row + 1], attention_mask=mask[row:row + 1], labels=labels[row:row + 1])
        torch.testing.assert_close(out.logits[row:row + 1], r.logits, rtol=0, atol=1e-5)
        with torch.no_grad():
            g = single.generate(input_ids=ids[row:row + 1], attention_mask=mask[row:row + 1], max_new_tokens=4,
                                do_sample=False, pad_token_id=1)
            b = single.generate(input_ids=ids[row:row + 1], attention_mask=mask[row:row + 1], max_new_tokens=4,
                                num_beams=2, do_sample=False, pad_token_id=1)
        assert torch.equal(gen[row:row + 1], g)
        assert torch.equal(beam[row:row + 1], b)
        n_tok = (labels[row, 1:] != -100).sum() + (labels[row, 0] != -100) * (name in ("pt", "prm"))
        losses.append((r.loss.detach(), n_tok))
        single.detach()
    # the bank's mean loss is the token-weighted mean of the per-task losses
    tot = sum(l * n for l, n in losses) / sum(n for _, n in losses)
    torch.testing.assert_close(out.loss.detach(), tot, rtol=1e-5, atol=1e-6)


def test_add_remove_task_leaves_others_untouched():
    hf = tiny_model("qwen3")
    adapters = _three_task_bank(hf)
    bank = TaskBank(hf, {"pre": adapters["pre"], "v2": adapters["v2"]})
    ids, mask, _ = batch("qwen3", 2, 6, "right")
    before = bank(input_ids=ids, attention_mask=mask, tasks=["pre", "v2"]).logits
    w = adapters["pre"].encoder.embedding.weight.clone()
    bank.add_task("pt", adapters["pt"])
    mid = bank(input_ids=ids, attention_mask=mask, tasks=["pre", "v2"]).logits
    bank.remove_task("pt")
    after = bank(input_ids=ids, attention_mask=mask, tasks=["pre", "v2"]).logits
    assert torch.equal(before, mid) and torch.equal(before, after)
    assert torch.equal(w, adapters["pre"].encoder.embedding.weight)
    with pytest.raises(ValueError, match="share P"):
        bank.add_task("other", PromptAdapter.prefix_tuning(hf, 3))
    with pytest.raises(ValueError, match="unknown task"):
        bank(input_ids=ids, attention_mask=mask, tasks=["pre", "nope"])
    with pytest.raises(ValueError, match="name one per row"):
        bank(input_ids=ids, attention_mask=mask)
    with pytest.raises(ValueError, match="already served"):
        TaskBank(hf, {"x": PromptAdapter.prefix_tuning(hf, 4)})


@pytest.mark.parametrize("method", ["prefix_proj", "ptuning_mlp", "ptuning_lstm", "prompt"])
def test_fold_patched_peft(method):
    pm = peft_model("llama", method, n=6)
    ids, mask, _ = batch("llama", 3, 7, "left")
    kw = dict(input_ids=ids, attention_mask=mask, max_new_tokens=5, do_sample=False, pad_token_id=1)
    # generate: PEFT's semantics from the PEFT-free oracle (PEFT 0.21.2's own generate is broken
    # on transformers 5.24, see test_bank_generate_equals_each_peft_model_left_padded)
    ref_gen = _greedy_oracle(tiny_model("llama"), pm, ids, mask, 5)
    with torch.no_grad():
        ref = pm(input_ids=ids, attention_mask=mask).logits
        ptune_fast.patch(pm)
        report = ptune_fast.fold(pm)
        got = pm(input_ids=ids, attention_mask=mask).logits
        got_gen = pm.generate(**kw)
    assert report["removed"] == ([] if method == "prompt" else report["removed"]) and isinstance(report, dict)
    if method != "prefix_proj":
        assert "keys" in report["static"]  # deep-folded: per-layer K/V of the virtual tokens
        state = pm._ptune_fast_patch.state
        calls = state.encoder_calls
        with torch.no_grad():
            pm(input_ids=ids, attention_mask=mask)
        assert state.encoder_calls == calls  # static prefix: no encoder run, no virtual-token pass
    rl = ref[:, -7:]
    assert ((got[:, -7:] - rl) * mask[:, :, None]).abs().max().item() <= 1e-4
    assert torch.equal(got_gen, ref_gen)
    assert not any(p.requires_grad for p in pm.prompt_encoder.parameters())


@pytest.mark.parametrize("method", ["prefix_proj", "ptuning_lstm", "ptuning_mlp"])
def test_patched_and_folded_peft_models_save_and_reload_in_peft(tmp_path, method):
    """PEFT's own save_pretrained works on patched (and folded) models; the directory reloads
    in PEFT, and patching the reloaded model gives the same logits."""
    import peft

    pm = peft_model("llama", method)
    ids, mask, _ = batch("llama", 2, 6, "left")
    ptune_fast.patch(pm)
    with torch.no_grad():
        ref = pm(input_ids=ids, attention_mask=mask).logits[:, -6:]
    pm.save_pretrained(str(tmp_path / "trained"))
    ptune_fast.fold(pm)
    pm.save_pretrained(str(tmp_path / "folded"))
    for sub in ("trained", "folded"):
        again = peft.PeftModel.from_pretrained(tiny_model("llama"), str(tmp_path / sub))
        ptune_fast.patch(again)
        with torch.no_grad():
            got = again(input_ids=ids, attention_mask=mask).logits[:, -6:]
        assert ((got - ref) * mask[:, :, None]).abs().max().item() <= 1e-5, sub


def test_fold_refuses_bidirectional():
    pm = peft_model("bert", "ptuning_mlp")
    ptune_fast.patch(pm)
    with pytest.raises(ValueError, match="bidirectional"):
        ptune_fast.fold(pm, deep=True)
    with pytest.raises(ValueError, match="bidirectional attention"):
        PromptAdapter.prompt_tuning(tiny_model("bert"), 4)


def test_own_files_round_trip_and_resume(tmp_path):
    hf = tiny_model("mistral")
    adapters = _three_task_bank(hf)
    bank = TaskBank(hf, adapters)
    ids, mask, labels = batch("mistral", 4, 6, "left")
    names = ["pre", "v2", "pt", "prm"]
    ref = bank(input_ids=ids, attention_mask=mask, labels=labels, tasks=names)
    bank.save_pretrained(str(tmp_path))
    bank.detach()
    bank2 = TaskBank.from_pretrained(hf, {n: str(tmp_path / n) for n in names})
    got = bank2(input_ids=ids, attention_mask=mask, labels=labels, tasks=names)
    torch.testing.assert_close(got.logits, ref.logits, rtol=0, atol=0)
    # the trainable encoder is back: training resumes
    got.loss.backward()
    assert bank2.tasks["pt"].encoder.lstm_head.weight_hh_l0.grad is not None
    bank2.fold()
    bank2.save_pretrained(str(tmp_path / "folded"))
    bank2.detach()
    bank3 = TaskBank.from_pretrained(hf, {n: str(tmp_path / "folded" / n) for n in names})
    with torch.no_grad():
        f = bank3(input_ids=ids, attention_mask=mask, tasks=names).logits
    assert bank3.tasks["prm"].folded == "deep"
    torch.testing.assert_close(f, ref.logits.detach(), rtol=0, atol=1e-5)


@pytest.mark.parametrize("method", ["prefix", "prefix_proj", "prompt", "ptuning_mlp"])
def test_peft_directory_loads(tmp_path, method):
    pm = peft_model("llama", method)
    ids, mask, _ = batch("llama", 2, 6, "left")
    with torch.no_grad():
        ref = pm(input_ids=ids, attention_mask=mask).logits[:, -6:]
    pm.save_pretrained(str(tmp_path))
    assert os.path.exists(tmp_path / "adapter_model.safetensors")
    bank = TaskBank.from_pretrained(tiny_model("llama"), {"t": str(tmp_path)})
    with torch.no_grad():
        got = bank(input_ids=ids, attention_mask=mask).logits
    assert ((got - ref) * mask[:, :, None]).abs().max().item() <= 1e-5


def test_bad_files_leave_bank_unchanged(tmp_path):
    hf = tiny_model("llama")
    adapters = _three_task_bank(hf)
    bank = TaskBank(hf, {"pre": adapters["pre"]})
    bank.save_pretrained(str(tmp_path))
    f = tmp_path / "pre" / "ptune_fast_adapter.safetensors"
    data = f.read_bytes()
    (tmp_path / "trunc").mkdir()
    (tmp_path / "trunc" / f.name).write_bytes(data[: len(data) // 2])
    (tmp_path / "corrupt").mkdir()
    (tmp_path / "corrupt" / f.name).write_bytes(b"\x00" * 8 + data[8:])
    ids, mask, _ = batch("llama", 1, 5, "none")
    before = bank(input_ids=ids, attention_mask=mask, tasks=["pre"]).logits
    for bad in ("trunc", "corrupt"):
        with pytest.raises(ValueError, match="could not read"):
            bank.load_task("x", str(tmp_path / bad))
    with pytest.raises(ValueError, match="neither a ptune_fast adapter"):
        bank.load_task("x", str(tmp_path / "missing"))
    other = tiny_model("gpt2")  # another model: 4 KV heads of 16, not 2
    with pytest.raises(ValueError, match="another model"):
        TaskBank.from_pretrained(other, {"pre": str(tmp_path / "pre")})
    assert bank.task_names == ["pre"]
    assert torch.equal(before, bank(input_ids=ids, attention_mask=mask, tasks=["pre"]).logits)


def test_prompt_embedding_inits():
    from ptune_fast.encoders import PromptEmbedding

    hf = tiny_model("llama")
    wte = hf.get_input_embeddings()
    text = PromptEmbedding(7, 64, "text", wte, init_token_ids=[5, 9, 11])
    assert torch.equal(text.embedding.weight, wte.weight[[5, 9, 11, 5, 9, 11, 5]].float())

    class Tok:
        def __call__(self, s):
            return {"input_ids": [len(w) for w in s.split()]}

    from_text = PromptEmbedding(4, 64, "text", wte, init_text="ab abc a", tokenizer=Tok())
    assert torch.equal(from_text.embedding.weight, wte.weight[[2, 3, 1, 2]].float())
    torch.manual_seed(0)
    sampled = PromptEmbedding(6, 64, "sample_vocab", wte)
    rows = (sampled.embedding.weight[:, None, :] == wte.weight[None].float()).all(-1)
    assert rows.any(-1).all()  # every virtual token starts as some vocabulary row
    with pytest.raises(ValueError, match="word_embeddings"):
        PromptEmbedding(4, 64, "text", init_token_ids=[1])
    with pytest.raises(ValueError, match="init must be"):
        PromptEmbedding(4, 64, "zeros")


# ---------------------------------------------------------------------- PEFT models in, PEFT models as reference
def _pms(kind, methods):
    """PEFT models of one tiny base model (same seed: same base weights), encoders differing."""
    return {name: peft_model(kind, m) for name, m in methods.items()}


@torch.no_grad()
def _greedy_oracle(hf, pm, ids, mask, steps):
    """PEFT's generate semantics for ``pm``'s adapter, through the plain ``hf`` model, without a
    cache or generate's bookkeeping: prompt methods prepend the virtual tokens (positions
    0..n+S-1 whatever the padding: PEFT drops position ids for them); prefix tuning puts the
    prefix in a fresh cache every step, positions = generate's padding-aware ids + P."""
    import inspect

    from transformers import DynamicCache

    from ptune_fast import reference

    enc, cfg = pm.prompt_encoder["default"], pm.peft_config["default"]
    emb = enc.embedding.weight.detach()
    lin = lambda seq: ([m.weight for m in seq if isinstance(m, torch.nn.Linear)],
                       [m.bias for m in seq if isinstance(m, torch.nn.Linear)])
    prefix = str(getattr(cfg.peft_type, "value", cfg.peft_type)) == "PREFIX_TUNING"
    if getattr(enc, "transform", None) is not None:
        out = reference.prefix_encoder(emb, *lin(enc.transform))
    elif getattr(enc, "lstm_head", None) is not None:
        out = reference.prompt_encoder_lstm(emb, enc.lstm_head, *lin(enc.mlp_head))
    elif getattr(enc, "mlp_head", None) is not None:
        out = reference.prompt_encoder_mlp(emb, *lin(enc.mlp_head))
    else:
        out = emb
    n, B, L = out.shape[0], ids.shape[0], cfg.num_layers
    cache_kw = "cache" if "cache" in inspect.signature(hf.forward).parameters else "past_key_values"
    for _ in range(steps):
        ones = mask.new_ones(B, n)
        if prefix:
            kv = out.view(n, 2 * L, cfg.num_attention_heads, -1).permute(1, 2, 0, 3)
            cache = DynamicCache(config=hf.config)
            for i in range(L):
                cache.update(kv[2 * i].expand(B, -1, -1, -1), kv[2 * i + 1].expand(B, -1, -1, -1), i)
            pos = (mask.cumsum(-1) - 1).masked_fill(mask == 0, 1) + n
            logits = hf(input_ids=ids, attention_mask=torch.cat([ones, mask], 1), position_ids=pos,
                        **{cache_kw: cache}).logits
        else:
            embeds = torch.cat([out.expand(B, -1, -1), hf.get_input_embeddings()(ids)], 1)
            logits = hf(inputs_embeds=embeds, attention_mask=torch.cat([ones, mask], 1)).logits
        ids = torch.cat([ids, logits[:, -1].argmax(-1, keepdim=True)], 1)
        mask = torch.cat([mask, mask.new_ones(B, 1)], 1)
    return ids


@pytest.mark.parametrize("kind", [  # generate passes padding-aware position ids to llama and gpt2, none to opt
    "llama", "gpt2", "opt"])
def test_bank_generate_equals_each_peft_model_left_padded(kind):
    """Issue 10 item 9: in generate, prompt / P-tuning rows ignore the padding-aware position ids,
    as PEFT does for prompt methods; prefix-tuning rows shift them by P. Greedy, left-padded
    batch of 3, one task per call and mixed rows, against each PEFT model's semantics alone
    (the PEFT-free greedy oracle: PEFT 0.21.2's own generate loses the virtual tokens after the
    first step on transformers 5.24, measured; its forward is compared in the from_peft test)."""
    pms = _pms(kind, {"prm": "prompt", "pt": "ptuning_mlp", "pre": "prefix_proj"})
    ids, mask, _ = batch(kind, 3, 7, "left")
    kw = dict(input_ids=ids, attention_mask=mask, max_new_tokens=4, do_sample=False, pad_token_id=1)
    plain = tiny_model(kind)
    refs = {name: _greedy_oracle(plain, pm, ids, mask, 4) for name, pm in pms.items()}
    bank = TaskBank.from_peft(pms, hf_model=tiny_model(kind))
    for name in pms:
        assert torch.equal(bank.generate(**kw, tasks=name), refs[name]), name
    mixed = ["pre", "prm", "pt"]
    got = bank.generate(**kw, tasks=mixed)
    for row, name in enumerate(mixed):
        assert torch.equal(got[row], refs[name][row]), (row, name)


@pytest.mark.parametrize("fold", [False, True])
def test_from_peft_equals_each_peft_model(fold):
    pms = _pms("llama", {"pre": "prefix_proj", "v2": "prefix", "pt": "ptuning_lstm", "prm": "prompt"})
    ids, mask, labels = batch("llama", 4, 6, "left")
    with torch.no_grad():
        refs = {name: pm(input_ids=ids, attention_mask=mask, labels=labels) for name, pm in pms.items()}
    bank = TaskBank.from_peft(pms, fold=fold)  # serves the first PeftModel's base model
    names = list(pms)
    out = bank(input_ids=ids, attention_mask=mask, tasks=names)
    for row, name in enumerate(names):
        diff = (out.logits[row] - refs[name].logits[row, -6:]) * mask[row, :, None]
        assert diff.abs().max().item() <= 1e-5, name
    for name in names:
        got = bank(input_ids=ids, attention_mask=mask, labels=labels, tasks=name)
        assert abs(got.loss.item() - refs[name].loss.item()) <= 1e-5, name
        if not fold:  # the encoder came over trainable
            got.loss.backward()
            assert all(p.grad is not None for p in bank.tasks[name].parameters()), name
    assert all(a.folded == ("" if not fold else "static" if a.method == "prefix_tuning" else "deep")
               for a in bank.tasks.values())


@pytest.mark.parametrize("method", ["prefix_proj", "ptuning_lstm", "prompt", "ptuning_mlp_folded"])
def test_save_peft_as_adapter_resumes(tmp_path, method):
    from ptune_fast import io

    pm = peft_model("llama", method.replace("_folded", ""))
    ids, mask, labels = batch("llama", 2, 6, "left")
    with torch.no_grad():
        ref = pm(input_ids=ids, attention_mask=mask, labels=labels)
    if method.endswith("_folded"):  # a patched, folded PEFT model: only the encoder's output is left
        ptune_fast.patch(pm)
        ptune_fast.fold(pm, deep=False)
    io.save_peft_as_adapter(pm, str(tmp_path))
    bank = TaskBank.from_pretrained(tiny_model("llama"), {"t": str(tmp_path)})
    got = bank(input_ids=ids, attention_mask=mask, labels=labels)
    assert ((got.logits - ref.logits[:, -6:]) * mask[:, :, None]).abs().max().item() <= 1e-5
    assert abs(got.loss.item() - ref.loss.item()) <= 1e-5
    if method.endswith("_folded"):
        assert bank.tasks["t"].folded == "static"
    else:  # resumable: PEFT's trainable encoder, in our file
        got.loss.backward()
        assert bank.tasks["t"].encoder is not None
        assert all(p.grad is not None for p in bank.tasks["t"].parameters())


def test_bank_state_dict_holds_the_base_model_once():
    hf = tiny_model("llama")
    bank = TaskBank(hf, _three_task_bank(hf))
    sd = bank.state_dict()
    base = {k[len("model."):] for k in sd if k.startswith("model.")}
    assert base == set(hf.state_dict())
    assert len(sd) == len(hf.state_dict()) + len(bank.tasks.state_dict())
    ids, mask, _ = batch("llama", 4, 5, "left")
    names = ["pre", "v2", "pt", "prm"]
    with torch.no_grad():
        ref = bank(input_ids=ids, attention_mask=mask, tasks=names).logits
    # loads into a bank of other weights; a state dict of an older bank (backbone twice) too
    old = dict(sd, **{"_backbone." + k: v for k, v in hf.model.state_dict().items()})
    for state in (sd, old):
        hf2 = tiny_model("llama", seed=3)
        other = TaskBank(hf2, _three_task_bank(hf2))
        other.load_state_dict(state, strict=True)
        with torch.no_grad():
            assert torch.equal(other(input_ids=ids, attention_mask=mask, tasks=names).logits, ref)
        other.detach()
