"""Failures change nothing, bad input is named, threads get their own tasks (issue 10, items
11-15): every failed call is checked by the model's outputs before and after it."""
import json
import threading

import pytest
import torch

import ptune_fast
from ptune_fast import PromptAdapter, TaskBank, io
from tests.models import batch, peft_model, tiny_model

pytest.importorskip("peft")


def _trainable(model):
    return {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}


def _same_trainable(a, b):
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def _untouched(hf):
    """What attaching changes on a plain transformers model."""
    hooks = sum(len(m._forward_pre_hooks) for m in hf.modules())
    return (hf.config._attn_implementation, hooks, "_ptune_fast_attachment" in hf.__dict__,
            tuple(p.requires_grad for p in hf.parameters()))


# ---------------------------------------------------------------------- item 12: fold
@pytest.mark.parametrize("kind,method", [("llama", "prefix_proj"), ("bert", "ptuning_mlp")])
def test_failed_deep_fold_leaves_patched_peft_model_unchanged(kind, method):
    pm = peft_model(kind, method)
    ptune_fast.patch(pm)
    ids, mask, _ = batch(kind, 2, 5, "left")
    with torch.no_grad():
        before = pm(input_ids=ids, attention_mask=mask).logits
    params = _trainable(pm)
    assert params
    with pytest.raises(ValueError, match="deep"):
        ptune_fast.fold(pm, deep=True)
    assert _same_trainable(params, _trainable(pm))
    assert pm.peft_config["default"].inference_mode is False
    with torch.no_grad():
        assert torch.equal(before, pm(input_ids=ids, attention_mask=mask).logits)
    report = ptune_fast.fold(pm, deep=False)  # the fold that can be done still works
    assert report["removed"] and not any("prompt_encoder" in k for k in _trainable(pm))


def test_failed_bank_fold_puts_every_task_back(monkeypatch):
    from ptune_fast.integrations import shared_pass

    hf = tiny_model("llama")
    torch.manual_seed(0)
    bank = TaskBank(hf, {"pre": PromptAdapter.prefix_tuning(hf, 3, True, 16),
                         "pt": PromptAdapter.p_tuning(hf, 3, "MLP", 16), "prm": PromptAdapter.prompt_tuning(hf, 3)})
    ids, mask, _ = batch("llama", 3, 5, "left")
    names = ["pre", "pt", "prm"]
    with torch.no_grad():
        before = bank(input_ids=ids, attention_mask=mask, tasks=names).logits
    params = _trainable(bank)
    real, calls = shared_pass.virtual_token_kv, []

    def second_deep_fold_fails(*args):
        calls.append(1)
        if len(calls) == 2:
            raise RuntimeError("out of memory (simulated)")
        return real(*args)

    monkeypatch.setattr(shared_pass, "virtual_token_kv", second_deep_fold_fails)
    with pytest.raises(RuntimeError, match="simulated"):
        bank.fold()  # "pre" and "pt" fold, then "prm" fails
    monkeypatch.undo()
    assert [a.folded for a in bank.tasks.values()] == ["", "", ""]
    assert _same_trainable(params, _trainable(bank))
    with torch.no_grad():
        assert torch.equal(before, bank(input_ids=ids, attention_mask=mask, tasks=names).logits)


# ---------------------------------------------------------------------- item 13: from_pretrained / from_peft
def test_failed_from_pretrained_leaves_the_model_as_it_was(tmp_path):
    hf = tiny_model("llama")
    ids, mask, _ = batch("llama", 2, 5, "left")
    with torch.no_grad():
        before = hf(input_ids=ids, attention_mask=mask).logits
    io.save_adapter(PromptAdapter.prefix_tuning(hf, 3), str(tmp_path / "good"))
    state = _untouched(hf)
    with pytest.raises(ValueError, match="bad"):
        TaskBank.from_pretrained(hf, {"good": str(tmp_path / "good"), "bad": str(tmp_path / "missing")})
    assert _untouched(hf) == state
    with torch.no_grad():
        assert torch.equal(before, hf(input_ids=ids, attention_mask=mask).logits)
    bank = TaskBank.from_pretrained(hf, {"good": str(tmp_path / "good")})  # a retry is not refused
    with torch.no_grad():
        served = bank(input_ids=ids, attention_mask=mask).logits
    bank.detach()
    with torch.no_grad():
        assert torch.equal(before, hf(input_ids=ids, attention_mask=mask).logits)
    with pytest.raises(RuntimeError, match="detached"):  # not silently the base model
        bank(input_ids=ids, attention_mask=mask)
    with torch.no_grad():
        assert torch.equal(served, bank.attach()(input_ids=ids, attention_mask=mask).logits)


def test_failed_bank_construction_and_from_peft_change_nothing():
    hf = tiny_model("llama")
    state = _untouched(hf)
    with pytest.raises(ValueError, match="share P"):
        TaskBank(hf, {"a": PromptAdapter.prefix_tuning(hf, 3), "b": PromptAdapter.prefix_tuning(hf, 4)})
    assert _untouched(hf) == state
    a, other_base = peft_model("llama", "prefix"), peft_model("llama", "prompt", seed=1)
    base = a.get_base_model()
    state = _untouched(base)
    with pytest.raises(ValueError, match=r"peft_models\['b'\].*weights differ"):
        TaskBank.from_peft({"a": a, "b": other_base})
    assert _untouched(base) == state
    with pytest.raises(TypeError, match=r"peft_models\['b'\]"):
        TaskBank.from_peft({"a": a, "b": tiny_model("llama")})
    assert _untouched(base) == state
    TaskBank.from_peft({"a": a}).detach()


# ---------------------------------------------------------------------- item 14: file integrity
def _flip(src, dst, old: bytes, new: bytes, count=1):
    data = src.read_bytes()
    assert data.count(old) >= count and len(old) == len(new)
    dst.parent.mkdir(parents=True, exist_ok=True)
    dst.write_bytes(data.replace(old, new, count))
    return dst


def test_tampered_adapter_files_are_refused(tmp_path):
    hf = tiny_model("llama")
    torch.manual_seed(0)
    bank = TaskBank(hf, {"pre": PromptAdapter.prefix_tuning(hf, 5, True, 16), "prm": PromptAdapter.prompt_tuning(hf, 5)})
    bank.tasks["prm"].fold(hf, bank._backbone, deep=True)
    bank.save_pretrained(str(tmp_path))
    ids, mask, _ = batch("llama", 2, 5, "left")
    with torch.no_grad():
        before = bank(input_ids=ids, attention_mask=mask, tasks=["pre", "prm"]).logits
    key = b'\\"num_virtual_tokens\\": '
    cases = {  # file, bytes flipped, how many, the field the error must name
        "n_top": ("pre", key + b"5", key + b"4", 1, "num_virtual_tokens"),
        "n_all": ("pre", key + b"5", key + b"4", 2, "encoder"),
        "n_deep": ("prm", key + b"5", key + b"4", 1, "num_virtual_tokens"),
        "method": ("prm", b"prompt_tuning", b"prefix_tuning", 1, "method"),
    }
    for case, (task, old, new, count, field) in cases.items():
        f = _flip(tmp_path / task / io.FILE, tmp_path / case / io.FILE, old, new, count)
        with pytest.raises(ValueError, match=f"{case}.*{field}"):
            bank.load_task("x", str(tmp_path / case))
    data = (tmp_path / "pre" / io.FILE).read_bytes()  # one bit of one tensor
    (tmp_path / "bits").mkdir()
    (tmp_path / "bits" / io.FILE).write_bytes(data[:-3] + bytes([data[-3] ^ 1]) + data[-2:])
    with pytest.raises(ValueError, match="bits.*sha256"):
        io.load_adapter(str(tmp_path / "bits"), hf)
    assert bank.task_names == ["pre", "prm"]
    with torch.no_grad():
        assert torch.equal(before, bank(input_ids=ids, attention_mask=mask, tasks=["pre", "prm"]).logits)


def test_files_without_checksum(tmp_path):
    """Files of format /1 (before the checksum) load after the cross-checks, with a warning;
    a /2 file whose checksum was removed is refused."""
    from safetensors.torch import load_file, save_file

    hf = tiny_model("llama")
    adapter = PromptAdapter.p_tuning(hf, 3, "LSTM", 16)
    io.save_adapter(adapter, str(tmp_path / "new"))
    path = tmp_path / "new" / io.FILE
    tensors = load_file(str(path))
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        meta = json.loads(f.metadata()["ptune_fast"])
    assert meta["format"] == io.FORMAT and len(meta["sha256"]) == 64
    v1 = {k: meta[k] for k in ("method", "num_virtual_tokens", "spec", "encoder")}
    (tmp_path / "v1").mkdir()
    save_file(tensors, str(tmp_path / "v1" / io.FILE), metadata={"ptune_fast": json.dumps(dict(v1, format=io.FORMAT_V1))})
    with pytest.warns(UserWarning, match="without a checksum"):
        old = io.load_adapter(str(tmp_path / "v1"), hf)
    assert all(torch.equal(a, b) for a, b in zip(old.state_dict().values(), adapter.state_dict().values()))
    (tmp_path / "stripped").mkdir()
    stripped = {k: v for k, v in meta.items() if k != "sha256"}
    save_file(tensors, str(tmp_path / "stripped" / io.FILE), metadata={"ptune_fast": json.dumps(stripped)})
    with pytest.raises(ValueError, match="stripped.*sha256"):
        io.load_adapter(str(tmp_path / "stripped"), hf)


# ---------------------------------------------------------------------- item 15: bad arguments
def test_zero_virtual_tokens_refused_up_front():
    hf = tiny_model("llama")
    state = _untouched(hf)
    for make in (ptune_fast.prompt_tuning, ptune_fast.p_tuning, ptune_fast.prefix_tuning):
        with pytest.raises(ValueError, match="num_virtual_tokens"):
            make(hf, 0)
    assert _untouched(hf) == state


def test_bad_task_indices_name_tasks():
    hf = tiny_model("llama")
    bank = TaskBank(hf, {"a": PromptAdapter.prefix_tuning(hf, 3), "b": PromptAdapter.prompt_tuning(hf, 3)})
    ids, mask, _ = batch("llama", 2, 5, "left")
    with torch.no_grad():
        before = bank(input_ids=ids, attention_mask=mask, tasks=torch.tensor([0, 1])).logits
    for bad in (torch.tensor([0, 2]), torch.tensor([-1, 0])):
        with pytest.raises(ValueError, match="tasks.*out of range"):
            bank(input_ids=ids, attention_mask=mask, tasks=bad)
        with pytest.raises(ValueError, match="tasks.*out of range"):
            bank.generate(input_ids=ids, attention_mask=mask, max_new_tokens=1, tasks=bad)
    with pytest.raises(TypeError, match="tasks.*integer"):
        bank(input_ids=ids, attention_mask=mask, tasks=torch.tensor([0.0, 1.0]))
    with pytest.raises(ValueError, match="tasks.*one task per row"):
        bank(input_ids=ids, attention_mask=mask, tasks=torch.tensor([0, 1, 1]))
    with torch.no_grad():
        assert torch.equal(before, bank(input_ids=ids, attention_mask=mask, tasks=torch.tensor([0, 1])).logits)
    single = TaskBank(tiny_model("llama"), {"a": PromptAdapter.prefix_tuning(hf, 3)})
    with pytest.raises(ValueError, match="out of range"):
        single(input_ids=ids, attention_mask=mask, tasks=torch.tensor([0, 1]))


# ---------------------------------------------------------------------- item 11: threads
def test_two_threads_get_their_own_tasks():
    hf = tiny_model("llama")
    torch.manual_seed(0)
    bank = TaskBank(hf, {"a": PromptAdapter.prefix_tuning(hf, 3), "b": PromptAdapter.prompt_tuning(hf, 3)})
    ids, mask, _ = batch("llama", 2, 5, "left")
    with torch.no_grad():
        ref = {t: bank(input_ids=ids, attention_mask=mask, tasks=t).logits for t in "ab"}
    wrong, start = [], threading.Barrier(2)

    def serve(task):
        start.wait()
        for _ in range(50):
            with torch.no_grad():
                out = bank(input_ids=ids, attention_mask=mask, tasks=task).logits
            if not torch.equal(out, ref[task]):
                wrong.append(task)

    threads = [threading.Thread(target=serve, args=(t,)) for t in "ab"]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not wrong, f"{len(wrong)} of 100 calls served another call's task"
