"""pytest-benchmark: the prompt / prefix encoder forward -- the one-launch CUDA encoder vs
PEFT's encoder run on B expanded rows vs ``nn.Sequential`` on one row. Skipped without CUDA;
``ptune_fast`` rows skipped without ``ptune_fast._C``.

Run (GPU)::

    pytest benchmarks/bench_prompt_encoder.py --benchmark-group-by=group \\
        --benchmark-columns=median,iqr,min,rounds --benchmark-json=benchmarks/results/prompt_encoder.json

n = 20 virtual tokens, token dim = encoder hidden = 4096, fp32 weights (as PEFT keeps them),
output cast to bf16 (the model dtype). Heads:

* ``prefix``  -- prefix tuning's projection Linear(4096, 4096)-Tanh-Linear(4096, 2*L*Hkv*D)
  with L=16, Hkv=8, D=64 (Llama-3.2-1B-like: 16384 outputs per token);
* ``ptuning`` -- P-tuning's MLP Linear-ReLU-Linear-ReLU-Linear, 4096 wide.

Implementations (forward only, ``torch.no_grad``; every timed call ends with
``torch.cuda.synchronize()``):

* ``peft_B{B}``  -- PEFT: embedding of ``[B, n]`` prompt-token ids then the ``nn.Sequential``
  on ``[B, n, 4096]`` (prefix tuning encodes every row; B in {1, 16, 64});
* ``sequential`` -- the same ``nn.Sequential`` on the ``n`` rows once (the embedding table);
* ``ptune_fast`` -- :func:`ptune_fast.ops.prompt_encoder.encoder_mlp` (gather + all layers in
  one cooperative kernel launch).
"""
from __future__ import annotations

import platform

import pytest
import torch
from torch import nn

CUDA = torch.cuda.is_available()
pytestmark = pytest.mark.skipif(not CUDA, reason="encoder benchmarks need a CUDA device")

N, DIM, HIDDEN = 20, 4096, 4096
PREFIX_OUT = 2 * 16 * 8 * 64
OUT_DTYPE = torch.bfloat16
HEADS = ("prefix", "ptuning")
IMPLS = ("peft_B1", "peft_B16", "peft_B64", "sequential", "ptune_fast")
ROUNDS, WARMUP, ITERS = 20, 3, 5


def _ext_available() -> bool:
    if not CUDA:
        return False
    from ptune_fast.ops import prompt_encoder as pe

    return pe._load_ops()


def make_encoder(head, seed=0):
    torch.manual_seed(seed)
    emb = nn.Embedding(N, DIM)
    if head == "prefix":
        seq = nn.Sequential(nn.Linear(DIM, HIDDEN), nn.Tanh(), nn.Linear(HIDDEN, PREFIX_OUT))
    else:
        seq = nn.Sequential(nn.Linear(DIM, HIDDEN), nn.ReLU(), nn.Linear(HIDDEN, HIDDEN), nn.ReLU(),
                            nn.Linear(HIDDEN, DIM))
    return emb.cuda(), seq.cuda()


def _fn(impl, head, emb, seq):
    linears = [m for m in seq if isinstance(m, nn.Linear)]
    ws = [m.weight for m in linears]
    bs = [m.bias for m in linears]
    act = "tanh" if head == "prefix" else "relu"
    if impl.startswith("peft_B"):
        B = int(impl[len("peft_B"):])
        ids = torch.arange(N, device="cuda").unsqueeze(0).expand(B, -1)
        return lambda: seq(emb(ids)).to(OUT_DTYPE)
    if impl == "sequential":
        return lambda: seq(emb.weight).to(OUT_DTYPE)
    from ptune_fast.ops.prompt_encoder import encoder_mlp

    return lambda: encoder_mlp(emb.weight, ws, bs, act, OUT_DTYPE)


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("head", HEADS)
def test_encoder_forward(benchmark, head, impl):
    if impl == "ptune_fast" and not _ext_available():
        pytest.skip("ptune_fast._C is not built")
    torch.backends.cuda.matmul.allow_tf32 = False  # PEFT's default fp32 matmuls
    benchmark.group = f"encoder {head} n={N} hidden={HIDDEN}"
    emb, seq = make_encoder(head)
    fn = _fn(impl, head, emb, seq)
    with torch.no_grad():
        out = fn()
        ref = seq(emb.weight).to(OUT_DTYPE)
        torch.testing.assert_close(out.reshape(-1, ref.shape[-1])[:N].float(), ref.float(), atol=2e-2, rtol=2e-2)

        def run():
            for _ in range(ITERS):
                fn()
            torch.cuda.synchronize()

        props = torch.cuda.get_device_properties(0)
        benchmark.extra_info.update(
            device=props.name, torch=torch.__version__, cuda=torch.version.cuda, python=platform.python_version(),
            head=head, n=N, hidden=HIDDEN, out_dtype=str(OUT_DTYPE), iterations_per_round=ITERS,
            weight_bytes=sum(p.numel() * p.element_size() for p in seq.parameters()),
        )
        benchmark.pedantic(run, rounds=ROUNDS, warmup_rounds=WARMUP)
