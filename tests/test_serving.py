"""Issue 13 item 1: a TaskBank served through transformers' continuous batching
(ptune_fast.serving.TaskBatchingManager): every request's greedy tokens equal its task's PEFT
semantics run alone (the PEFT-free oracle: PEFT 0.21.2's own generate drops the prefix on
transformers 5.24), for batches that mix tasks, lengths, prefill and decode rows, requests that
join and leave mid-stream, and tasks added or removed while serving."""
import time

import pytest
import torch

pytest.importorskip("peft")
transformers = pytest.importorskip("transformers")
pytest.importorskip("transformers.generation.continuous_batching")

from transformers import GenerationConfig  # noqa: E402

from ptune_fast import TaskBank  # noqa: E402
from ptune_fast.integrations.core import backbone_of  # noqa: E402
from ptune_fast.io import adapter_from_peft  # noqa: E402
from ptune_fast.oracle import Oracle  # noqa: E402
from ptune_fast.serving import TaskBatchingManager  # noqa: E402
from ptune_fast.serving import paged  # noqa: E402
from tests.models import V, peft_model, tiny_model  # noqa: E402

METHODS = {"pre": "prefix_proj", "v2": "prefix", "prm": "prompt", "pt": "ptuning_mlp", "lstm": "ptuning_lstm"}
PAGE = {"page_size": 16} if hasattr(transformers.ContinuousBatchingConfig, "page_size") else {"block_size": 16}
CB = dict(num_blocks=48, max_batch_tokens=48, **PAGE)  # small batches: the scheduler must interleave


def _task_pm(kind, method, seed):
    """A PEFT model of the shared tiny base (seed 0) with its own random encoder."""
    pm = peft_model(kind, method)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, p in pm.named_parameters():
            if p.requires_grad:
                p.copy_(torch.randn(p.shape, generator=g) * 0.5)
    return pm


class Refs:
    """Each task's PEFT semantics alone (oracle greedy loop, no EOS), memoised per prompt."""

    def __init__(self, kind, pms, methods=METHODS):
        self.plain = tiny_model(kind)
        self.plain.generation_config.eos_token_id = None
        self.oracles = {}
        for name, pm in pms.items():
            cfg = pm.peft_config["default"]
            self.oracles[name] = Oracle(self.plain, methods[name], pm.prompt_encoder["default"], backbone_of(self.plain),
                                        cfg.num_layers, cfg.num_attention_heads)
        self._memo = {}

    def __call__(self, task, ids, n):
        key = (task, tuple(ids), n)
        if key not in self._memo:
            t = torch.tensor([ids])
            self._memo[key] = self.oracles[task].greedy(t, torch.ones_like(t), n)[0, len(ids):].tolist()
        return self._memo[key]


@pytest.fixture(scope="module")
def setup():
    pms = {name: _task_pm("llama", m, 100 + i) for i, (name, m) in enumerate(METHODS.items())}
    return pms, Refs("llama", pms)


def _manager(pms, names, **kw):
    bank = TaskBank.from_peft({n: pms[n] for n in names}, hf_model=tiny_model("llama"))
    gc = GenerationConfig(do_sample=False, max_new_tokens=6, eos_token_id=-1)
    return TaskBatchingManager.from_bank(bank, generation_config=gc, **{**CB, **kw})


def _prompts(n, seed, lo=2, hi=14):
    g = torch.Generator().manual_seed(seed)
    lens = torch.randint(lo, hi, (n,), generator=g).tolist()
    return [torch.randint(3, V, (L,), generator=g).tolist() for L in lens]


def test_mixed_tasks_and_lengths_equal_each_task_alone(setup):
    pms, refs = setup
    names = list(METHODS)
    mgr = _manager(pms, names)
    prompts = _prompts(10, seed=1)
    tasks = [names[i % len(names)] for i in range(10)]
    new = [3 + (i * 5) % 7 for i in range(10)]  # requests leave at different steps
    with mgr:
        got = mgr.generate(prompts, tasks, max_new_tokens=new)
    for p, t, n, g in zip(prompts, tasks, new, got):
        assert g == refs(t, p, n), (t, p)
    st = mgr.stats
    assert st["mixed_task_steps"] >= 1 and st["mixed_length_steps"] >= 1 and st["max_requests"] >= 3, st
    # the per-row prefix matters: the same prompt under another task generates other tokens
    assert refs("pre", prompts[0], new[0]) != refs("v2", prompts[0], new[0])
    # stop() gives the bank its attention back; the bank still serves its own generate
    model = mgr.bank.model
    assert model.config._attn_implementation == "ptune_fast"
    out = mgr.bank.generate(input_ids=torch.tensor([prompts[1]]), max_new_tokens=4, do_sample=False,
                            tasks="v2", eos_token_id=None, pad_token_id=1)
    assert out[0, len(prompts[1]):].tolist() == refs("v2", prompts[1], 4)


def test_requests_join_and_leave_mid_stream_and_tasks_change_while_serving(setup):
    pms, refs = setup
    mgr = _manager(pms, ["pre", "prm", "pt"])
    mgr.trace = []
    first = _prompts(4, seed=2)
    first_tasks = ["pre", "prm", "pt", "pre"]
    second = _prompts(4, seed=3)
    second_tasks = ["v2", "pt", "v2", "prm"]
    with mgr:
        ids1 = [mgr.add_request(p, t, max_new_tokens=12) for p, t in zip(first, first_tasks)]
        deadline = time.monotonic() + 60
        while mgr.stats["steps"] < 3 and time.monotonic() < deadline:
            time.sleep(0.005)
        # a new task joins while the first requests decode; an idle one leaves
        mgr.add_task("v2", adapter_from_peft(pms["v2"]))
        with pytest.raises(ValueError, match="in flight"):
            mgr.remove_task("pre")
        ids2 = [mgr.add_request(p, t, max_new_tokens=4) for p, t in zip(second, second_tasks)]
        out2 = mgr.wait(ids2)
        out1 = mgr.wait(ids1)
        mgr.remove_task("prm")  # idle now
        with pytest.raises(KeyError, match="unknown task"):
            mgr.add_request([5, 6], "prm")
        late = mgr.generate([first[0]], ["pre"], max_new_tokens=5)
    for p, t, o in zip(first, first_tasks, out1):
        assert o.generated_tokens == refs(t, p, 12), (t, p)
    for p, t, o in zip(second, second_tasks, out2):
        assert o.generated_tokens == refs(t, p, 4), (t, p)
    assert late == [refs("pre", first[0], 5)]
    # the second wave really joined running requests: one step held requests of both waves
    both = [ids for ids, _ in mgr.trace if set(ids) & set(ids1) and set(ids) & set(ids2)]
    assert both, mgr.trace[:6]
    # and first-wave requests kept running after the second wave had left
    after = [ids for ids, _ in mgr.trace if set(ids) & set(ids1) and not set(ids) & set(ids2)]
    assert after


def test_gpt2_absolute_positions_single_task(setup):
    pm = _task_pm("gpt2", "prefix", 7)
    refs = Refs("gpt2", {"a": pm}, {"a": "prefix"})
    bank = TaskBank.from_peft({"a": pm}, hf_model=tiny_model("gpt2"))
    prompts = _prompts(3, seed=4)
    with TaskBatchingManager(bank, generation_config=GenerationConfig(do_sample=False, eos_token_id=-1),
                             **CB) as mgr:
        got = mgr.generate(prompts, "a", max_new_tokens=5)
    assert got == [refs("a", p, 5) for p in prompts]


def test_eos_ends_a_request(setup):
    pms, refs = setup
    mgr = _manager(pms, ["pre"])
    p = _prompts(1, seed=5)[0]
    ref = refs("pre", p, 6)
    with mgr:
        out = mgr.wait([mgr.add_request(p, "pre", max_new_tokens=6, eos_token_id=ref[2])])[0]
    assert out.generated_tokens == ref[: ref.index(ref[2]) + 1]


def test_refusals(setup):
    pms, _ = setup
    bank = TaskBank.from_peft({"prm": pms["prm"]}, hf_model=tiny_model("llama"))
    with pytest.raises(ValueError, match="deep-folded"):
        TaskBatchingManager(bank)
    with pytest.raises(ValueError, match="use_cuda_graph"):
        TaskBatchingManager.from_bank(bank, use_cuda_graph=True)
    with pytest.raises(ValueError, match="one sequence per request"):
        TaskBatchingManager.from_bank(bank, generation_config=GenerationConfig(num_beams=2))
    mgr = TaskBatchingManager.from_bank(bank, **CB)
    with pytest.raises(ValueError, match="too long"):
        mgr.check_request("prm", 120, 10)
    with pytest.raises(RuntimeError, match="not started"):
        mgr.add_request([3, 4], "prm")
    opt = TaskBank.from_peft({"a": peft_model("opt", "prefix")}, hf_model=tiny_model("opt"))
    with pytest.raises(ValueError, match="positions"):
        TaskBatchingManager(opt)
    # the paged function refuses to run outside a continuous-batching step
    with pytest.raises(RuntimeError, match="only runs inside"):
        paged.paged_prefix_attention(None, torch.zeros(1, 1, 1, 4), torch.zeros(1, 1, 1, 4),
                                     torch.zeros(1, 1, 1, 4), None)
