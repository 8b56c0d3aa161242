"""Shared helpers for the benchmarks: a small Llama, PEFT prompt-learning cases, timing,
memory accounting and device/version information.

Everything here builds models from configs (no downloads). The same :class:`Case` serves the
pytest-benchmark suite (``benchmarks/bench_train_step.py``) and the standalone report
(``python -m benchmarks.train_step_report``), so both measure the same step.

Memory, what each number means
------------------------------
* ``prefix_bytes`` -- *computed from shapes*, not measured: the K/V of the P virtual tokens
  a step materializes, with ``X = L*2*Hkv*P*D*elem``. PEFT prefix tuning: the encoder output
  ``[B, P, 2*L*Hkv*D]`` plus the prefix rows of the ``torch.cat`` copies the ``DynamicCache``
  makes of ``[prefix ; K/V]`` in every layer: ``2*B*X``. PEFT P-tuning: the virtual tokens' rows
  of every row's per-layer K/V, counted once: ``B*X`` (a lower bound). ptune_fast (prefix tuning,
  and P-tuning with the shared virtual-token pass): one ``keys/values [L, Hkv, P, D]``: ``X``;
  :meth:`Case.state_bytes` measures it on the patched model's state.
* ``peak_bytes`` -- *measured*: the peak of tensor memory allocated by one training step
  (forward + backward + AdamW step) above what was live before it. CUDA:
  ``torch.cuda.max_memory_allocated``; CPU: the running sum of the allocator's
  ``[memory]`` events recorded by ``torch.profiler.profile(profile_memory=True)``. Model
  weights, optimizer state and the input batch are live before the step and not counted.
* ``saved_bytes`` -- *measured*: bytes of the distinct storages autograd saves for backward
  during the forward (``torch.autograd.graph.saved_tensors_hooks``), i.e. the activation
  memory held between forward and backward. Parameters are excluded.
"""
from __future__ import annotations

import datetime as _dt
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass, field
from typing import Callable, Dict, List, Optional

import torch

#: The benchmark grid.
METHODS = ("prefix_proj", "ptuning_mlp")
BATCHES = (1, 8, 32)
SEQ_LEN = 64
NUM_VIRTUAL_TOKENS = 20

#: A small Llama: one CPU training step is tens of ms at B=1.
SMALL_LLAMA = dict(
    hidden_size=256,
    intermediate_size=512,
    num_hidden_layers=4,
    num_attention_heads=8,
    num_key_value_heads=4,
    head_dim=32,
    vocab_size=1000,
    max_position_embeddings=512,
    initializer_range=0.02,
    attention_dropout=0.0,
)

#: Encoder sizes (``encoder_hidden_size``) of the PEFT configs.
PREFIX_ENCODER_HIDDEN = 512
PTUNING_ENCODER_HIDDEN = 256

METHOD_LABEL = {
    "prefix_proj": "prefix tuning (projection)",
    "ptuning_mlp": "P-tuning (MLP)",
}


def device() -> torch.device:
    """``PTUNE_FAST_BENCH_DEVICE`` (``cpu``/``cuda``), else CUDA when available."""
    name = os.environ.get("PTUNE_FAST_BENCH_DEVICE")
    if name:
        return torch.device(name)
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def sync(dev: torch.device) -> None:
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)


# ------------------------------------------------------------------------------ models


def llama_config(**overrides):
    import transformers

    kw = dict(SMALL_LLAMA)
    kw.update(overrides)
    return transformers.LlamaConfig(**kw)


def peft_config(method: str, num_virtual_tokens: int = NUM_VIRTUAL_TOKENS):
    import peft

    if method == "prefix_proj":
        return peft.PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=num_virtual_tokens,
                                       prefix_projection=True, encoder_hidden_size=PREFIX_ENCODER_HIDDEN)
    if method == "ptuning_mlp":
        return peft.PromptEncoderConfig(task_type="CAUSAL_LM", num_virtual_tokens=num_virtual_tokens,
                                        encoder_hidden_size=PTUNING_ENCODER_HIDDEN,
                                        encoder_reparameterization_type="MLP")
    raise KeyError(method)


def build_peft_model(method: str, dtype=torch.float32, dev=None, seed: int = 0,
                     num_virtual_tokens: int = NUM_VIRTUAL_TOKENS):
    import peft
    import transformers

    torch.manual_seed(seed)
    base = transformers.LlamaForCausalLM(llama_config()).to(dtype)
    torch.manual_seed(seed + 1)
    pm = peft.get_peft_model(base, peft_config(method, num_virtual_tokens))
    if dev is not None:
        pm = pm.to(dev)
    return pm


def make_batch(B: int, S: int = SEQ_LEN, vocab: int = SMALL_LLAMA["vocab_size"], dev=None, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, vocab, (B, S), generator=g)
    mask = torch.ones(B, S, dtype=torch.long)
    ids, mask = ids.to(dev), mask.to(dev)
    return ids, mask, ids.clone()


# ------------------------------------------------------------------------------ cases


@dataclass
class Case:
    """One (method, impl, B) configuration: a model, its optimizer, a batch and callables."""

    method: str
    impl: str  # "peft" | "ptune_fast"
    B: int
    S: int
    dev: torch.device
    pm: object
    opt: torch.optim.Optimizer
    batch: tuple
    shape: Dict[str, int] = field(default_factory=dict)

    # -- the timed things
    def step(self) -> float:
        """One training step: forward + backward + AdamW step. Returns the loss."""
        ids, mask, labels = self.batch
        self.opt.zero_grad(set_to_none=True)
        loss = self.pm(input_ids=ids, attention_mask=mask, labels=labels).loss
        loss.backward()
        self.opt.step()
        return loss

    def forward_loss(self):
        ids, mask, labels = self.batch
        return self.pm(input_ids=ids, attention_mask=mask, labels=labels).loss

    def encoder(self):
        """The encoder forward alone, with autograd on as in training.

        PEFT: ``pm.get_prompt(B)`` (prefix tuning: the encoder on ``[B, P]`` prompt tokens, the
        reshape/permute and the ``DynamicCache``; P-tuning: the encoder on one row, ``repeat``-ed
        ``B`` times). ptune_fast: prefix tuning: the patched state's provider (encoder on the ``P``
        rows, split into ``[L, Hkv, P, D]`` K/V); P-tuning: ``ptune_fast.encoders.encode`` of the
        encoder, i.e. its ``n`` rows once (what the patched model feeds to its virtual-token pass,
        or broadcasts with ``expand``); the shared virtual-token backbone pass is not included."""
        if self.impl == "ptune_fast":
            if self.method.startswith("prefix"):
                return self.pm._ptune_fast_patch.state.provider()
            from ptune_fast.encoders import encode

            return encode(self.pm.prompt_encoder[self.pm.active_adapter])
        return self.pm.get_prompt(self.B)

    # -- accounting
    def prefix_bytes(self) -> int:
        """K/V bytes of the P virtual tokens materialized per step, computed from shapes.

        With ``X = L*2*Hkv*P*D*elem``: PEFT prefix tuning ``2*B*X`` (encoder output + the prefix
        rows of the cache's per-layer ``torch.cat`` copies); PEFT P-tuning ``B*X`` (the virtual
        tokens' rows of every row's per-layer K/V, one copy counted: a lower bound);
        ptune_fast ``X`` (one shared ``[L, Hkv, P, D]`` K and V)."""
        s = self.shape
        one = s["L"] * 2 * s["Hkv"] * s["P"] * s["D"] * s["elem"]
        if self.impl == "ptune_fast":
            return one
        return (2 if self.method.startswith("prefix") else 1) * self.B * one

    def state_bytes(self) -> Optional[int]:
        """Measured bytes of the patched model's prefix state (``keys`` + ``values`` storages)
        after the last step; None for PEFT or when the patch keeps no K/V state."""
        patch = getattr(self.pm, "_ptune_fast_patch", None)
        st = getattr(patch, "state", None)
        if st is None or st.keys is None:
            return None
        return int(st.keys.untyped_storage().nbytes() + st.values.untyped_storage().nbytes())


def make_case(method: str, impl: str, B: int, S: int = SEQ_LEN, dev=None, dtype=torch.float32,
              seed: int = 0, num_virtual_tokens: int = NUM_VIRTUAL_TOKENS, lr: float = 1e-3) -> Case:
    """Build a fresh PEFT model (patched with ``ptune_fast.patch`` when ``impl == "ptune_fast"``)."""
    if impl not in ("peft", "ptune_fast"):
        raise ValueError(f"impl must be 'peft' or 'ptune_fast', got {impl!r}")
    dev = dev or device()
    pm = build_peft_model(method, dtype, dev, seed, num_virtual_tokens)
    if impl == "ptune_fast":
        import ptune_fast

        ptune_fast.patch(pm)
    pm.train()
    params = [p for p in pm.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=lr)
    cfg = pm.peft_config[pm.active_adapter]
    hf = pm.get_base_model().config
    shape = dict(L=hf.num_hidden_layers, P=cfg.num_virtual_tokens, elem=torch.empty((), dtype=dtype).element_size(),
                 Hkv=hf.num_key_value_heads, D=getattr(hf, "head_dim", None) or hf.hidden_size // hf.num_attention_heads)
    if method.startswith("prefix"):  # PEFT's own prefix sizing (KV heads for GQA)
        shape.update(L=cfg.num_layers, Hkv=cfg.num_attention_heads, D=cfg.token_dim // cfg.num_attention_heads)
    return Case(method, impl, B, S, dev, pm, opt, make_batch(B, S, dev=dev, seed=seed), shape)


# ------------------------------------------------------------------------------ timing


def time_fn(fn: Callable, dev: torch.device, warmup: int = 3, repeat: int = 10) -> List[float]:
    """Seconds per call of ``fn`` (device-synchronized), after ``warmup`` untimed calls."""
    for _ in range(warmup):
        fn()
    sync(dev)
    out = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        sync(dev)
        out.append(time.perf_counter() - t0)
    return out


def median_iqr(xs: List[float]):
    """``(median, q1, q3)`` (inclusive quartiles)."""
    xs = sorted(xs)
    if len(xs) == 1:
        return xs[0], xs[0], xs[0]
    q = statistics.quantiles(xs, n=4, method="inclusive")
    return statistics.median(xs), q[0], q[2]


def synced(fn: Callable, dev: torch.device) -> Callable:
    def run():
        out = fn()
        sync(dev)
        return out

    return run


# ------------------------------------------------------------------------------ memory


def peak_bytes(fn: Callable, dev: torch.device) -> int:
    """Peak tensor memory allocated while ``fn`` runs, above what was live before (see module doc)."""
    sync(dev)
    if dev.type == "cuda":
        base = torch.cuda.memory_allocated(dev)
        torch.cuda.reset_peak_memory_stats(dev)
        fn()
        sync(dev)
        return int(torch.cuda.max_memory_allocated(dev) - base)
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    events = [e for e in prof.profiler.kineto_results.events()
              if e.name() == "[memory]" and e.device_type() == torch.autograd.DeviceType.CPU]
    events.sort(key=lambda e: e.start_ns())
    cur = peak = 0
    for e in events:
        cur += e.nbytes()
        peak = max(peak, cur)
    return int(peak)


def saved_bytes(forward: Callable, params) -> int:
    """Bytes of the distinct storages autograd saves during ``forward()`` (parameters excluded).

    Runs ``forward`` (which must return a scalar loss) and then backward to free the graph."""
    skip = {p.untyped_storage().data_ptr() for p in params}
    seen: Dict[int, int] = {}

    def pack(t):
        if isinstance(t, torch.Tensor) and t.layout == torch.strided:
            st = t.untyped_storage()
            ptr = st.data_ptr()
            if ptr and ptr not in skip:
                seen[ptr] = st.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss = forward()
    loss.backward()
    return int(sum(seen.values()))


# ------------------------------------------------------------------------------ attribution

_ATTN_FORWARD = ("aten::scaled_dot_product_attention", "ptune_fast::prefix_attention")
_ATTN_BACKWARD = ("ScaledDotProduct", "prefix_attention")


def attention_ms(fn: Callable, dev: torch.device, steps: int = 2, sessions: int = 3) -> Dict[str, float]:
    """Median over ``sessions`` profiler sessions of :func:`_attention_ms_once` (``steps`` steps each)."""
    runs = [_attention_ms_once(fn, dev, steps) for _ in range(sessions)]
    return {k: statistics.median(r[k] for r in runs) for k in runs[0]}


def _attention_ms_once(fn: Callable, dev: torch.device, steps: int) -> Dict[str, float]:
    """Per-step time of the attention op (forward + backward) under ``torch.profiler``.

    Counts the top-level attention calls -- ``aten::scaled_dot_product_attention`` (PEFT's Llama
    on SDPA) or ``ptune_fast::prefix_attention`` -- and their autograd backward nodes
    (``autograd::engine::evaluate_function: ...``). CPU: their CPU time including children;
    CUDA: their device time. Also returns the profiled step's total (profiler overhead
    included), so the share is comparable between the two implementations."""
    from torch.profiler import ProfilerActivity, profile

    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if dev.type == "cuda" else [])
    sync(dev)
    t0 = time.perf_counter()
    with profile(activities=acts) as prof:
        for _ in range(steps):
            fn()
        sync(dev)
    wall = time.perf_counter() - t0
    attr = "device_time_total" if dev.type == "cuda" else "cpu_time_total"
    attn = 0.0
    for e in prof.key_averages():
        k = e.key
        if k in _ATTN_FORWARD or (k.startswith("autograd::engine::evaluate_function:")
                                  and any(n in k for n in _ATTN_BACKWARD)):
            attn += getattr(e, attr)
    return {"attention_ms": attn / 1e3 / steps, "profiled_step_ms": wall * 1e3 / steps}


# ------------------------------------------------------------------------------ environment


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.lower().startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def git_commit() -> Optional[str]:
    try:
        root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
        out = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=root, capture_output=True, text=True)
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=root,
                               capture_output=True, text=True).stdout.strip()
        return out.stdout.strip() + ("+dirty" if dirty else "") if out.returncode == 0 else None
    except OSError:
        return None


def env_info(dev: Optional[torch.device] = None) -> Dict[str, object]:
    import peft
    import transformers

    import ptune_fast

    dev = dev or device()
    info = {
        "date": _dt.datetime.now().astimezone().isoformat(timespec="seconds"),
        "device": dev.type,
        "cpu": cpu_model(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "peft": peft.__version__,
        "ptune_fast": ptune_fast.__version__,
        "git_commit": git_commit(),
        "backend_env": os.environ.get("PTUNE_FAST_BACKEND", "auto"),
        "platform": platform.platform(),
    }
    if dev.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(dev)
        info["cuda"] = torch.version.cuda
    return info


def model_info() -> Dict[str, object]:
    return dict(model="LlamaForCausalLM (random init, from config)", **SMALL_LLAMA, seq_len=SEQ_LEN,
                num_virtual_tokens=NUM_VIRTUAL_TOKENS, prefix_encoder_hidden_size=PREFIX_ENCODER_HIDDEN,
                ptuning_encoder_hidden_size=PTUNING_ENCODER_HIDDEN, dtype="float32", optimizer="AdamW(lr=1e-3)")


def command_line() -> str:
    return " ".join([os.path.basename(sys.executable)] + sys.argv)


def loadavg() -> Optional[float]:
    """1-minute load average (reports record it: the CPU is shared), or None where unknown."""
    try:
        return round(os.getloadavg()[0], 2)
    except OSError:
        return None


def write_report(report: dict, md: str, out_dir: str, stem_name: str) -> str:
    """Write ``<out_dir>/<stem_name>.md`` and ``.json``; returns the path stem."""
    os.makedirs(out_dir, exist_ok=True)
    stem = os.path.join(out_dir, stem_name)
    with open(stem + ".md", "w") as f:
        f.write(md)
    with open(stem + ".json", "w") as f:
        json.dump(report, f, indent=1)
    print(f"wrote {stem}.md and {stem}.json", file=sys.stderr)
    return stem
