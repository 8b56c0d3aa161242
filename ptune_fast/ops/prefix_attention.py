"""``prefix_attention``: attention over ``[prefix ; sequence]`` without expanding or
concatenating the prefix. Public op, input checks, backend dispatch, ``torch.library``
registration (``ptune_fast::prefix_attention`` + its backward) and autograd.

Backends (see :mod:`ptune_fast._backend`):

* ``cuda``      -- ``ptune_fast._C`` decode kernel (1..8 query tokens, no autograd, fp16/bf16);
  skipped whenever an input requires grad;
* ``triton``    -- fused flash-attention forward/backward (``_prefix_attention_triton``), fp16/bf16
  on CUDA; fp32 CUDA calls fall back to ``sdpa`` (counted in ``_backend.FALLBACKS``) unless
  ``PTUNE_FAST_TRITON_TF32=1`` lets Triton serve them with TF32 dots;
* ``sdpa``      -- PyTorch's fused SDPA over ``[prefix ; k/v]`` concatenated inside the call
  (``_prefix_attention_sdpa``): the CPU path, and the CUDA fallback when Triton cannot serve;
  in eager mode it runs outside the registered op, with PyTorch's native autograd;
* ``reference`` -- :func:`ptune_fast.reference.prefix_attention`, the oracle (run when forced).

Layouts (the reference's)::

    q                 [B, H,   S, D]   queries of the S new tokens
    k, v              [B, Hkv, T, D]   the sequence's keys/values, cache included (T >= S if causal)
    prefix_k/v        [Hkv, P, D]      one prefix shared by every row, or
                      [N, Hkv, P, D]   a bank, with task_ids [B] (int32/int64) naming each row's entry
    key_padding_mask  [B, T] bool      True = real token (the prefix is never masked)
    out               [B, H,   S, D]   in q.dtype, or [B, S, H, D] (contiguous) with out_layout="bshd"

A bank row whose task id is outside ``[0, N)`` outputs NaN and gets zero gradients, on every
backend, without a host sync (see :mod:`ptune_fast.reference`).

Causal alignment is bottom-right: query ``i`` sits at sequence position ``T - S + i``. P = 2,
T = 4, S = 2::

              prefix | sequence
              p0 p1  | t0 t1 t2 t3
    q0 (t2)    x  x  |  x  x  x  .
    q1 (t3)    x  x  |  x  x  x  x

The backend is chosen *inside* the registered op (opaque to ``torch.compile``: no graph break
at the call, and the env var ``PTUNE_FAST_BACKEND`` / the counters are read at run time).
The backward re-runs the same choice (a forced backend must be forced for both).

Determinism: the Triton backward's dQ is accumulated with fp32 atomics by default (the fused
5-matmul backward, FlashAttention-2's default): ``dq`` may differ in its last bits run to run.
Under ``torch.use_deterministic_algorithms(True)`` or ``PTUNE_FAST_DETERMINISTIC=1`` it runs the
split backward (a separate dQ pass, 7 matmuls per tile pair instead of 5, no atomics), whose
gradients are bitwise reproducible for a given tile config (the autotuner picks tiles by timing,
so two processes may pick differently and sum in another order). dK, dV and the bank / prefix
gradients (summed over rows in row order) are reproducible on both paths. The ``sdpa``/``reference`` backwards take
the bank gradient from autograd's ``index_select`` backward (atomics on CUDA: reproducible there
only under ``torch.use_deterministic_algorithms(True)``).

Compile ahead: :func:`warmup` runs (and so autotunes and compiles) the Triton kernels for a set of
shapes, e.g. before CUDA-graph capture, where a first-call autotune cannot run.
"""

import contextlib
import importlib
from typing import Iterable, Optional, Sequence

import torch

from ptune_fast import _backend, reference

OP = "prefix_attention"
Tensor = torch.Tensor
# the module (``ptune_fast.ops.decode_attention`` is the function once the package is imported)
_dec = importlib.import_module("ptune_fast.ops.decode_attention")


#: Input validation shared with ``decode_attention`` (lives in the reference: no import cycle).
check_inputs = reference.check_prefix_attention_inputs
OUT_LAYOUTS = ("bhsd", "bshd")


def _needs_grad(*tensors) -> bool:
    return torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors)


def prefix_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    prefix_k: Optional[torch.Tensor] = None,
    prefix_v: Optional[torch.Tensor] = None,
    task_ids: Optional[torch.Tensor] = None,
    key_padding_mask: Optional[torch.Tensor] = None,
    causal: bool = True,
    scale: Optional[float] = None,
    dropout_p: float = 0.0,
    out_layout: str = "bhsd",
) -> torch.Tensor:
    """Attention of ``q [B,H,S,D]`` over ``[prefix ; k/v]``; returns ``out [B,H,S,D]`` (q.dtype),
    or with ``out_layout="bshd"`` a contiguous ``out [B,S,H,D]`` -- the layout transformers'
    attention functions return -- that the Triton kernel writes directly (no transpose copy;
    other backends copy).

    See the module docstring for layouts and the bottom-right causal alignment; semantics are
    exactly :func:`ptune_fast.reference.prefix_attention`'s (prefix always visible, GQA by
    ``h // (H // Hkv)``, rows with no visible key output 0). ``scale`` defaults to ``D**-0.5``.
    ``dropout_p > 0`` drops softmax probabilities (pass 0 in eval); the mask is reproducible from
    torch's generator (``torch.manual_seed``) but differs between the Triton and reference backends.
    Differentiable in q, k, v, prefix_k, prefix_v (a shared prefix gets the sum over rows, a bank
    one gradient per entry). Works under ``torch.compile(fullgraph=True)``.
    """
    check_inputs(q, k, v, prefix_k, prefix_v, task_ids, key_padding_mask, causal, dropout_p)
    if out_layout not in OUT_LAYOUTS:
        raise ValueError(f"out_layout must be one of {OUT_LAYOUTS}, got {out_layout!r}")
    bshd = out_layout == "bshd"
    if prefix_k is not None and prefix_k.shape[-2] == 0:
        prefix_k = prefix_v = task_ids = None
    if not torch.compiler.is_compiling() and not q.is_cuda and _backend.forced_backend() in (None, "sdpa"):
        # eager CPU: PyTorch's fused SDPA with its native autograd (no recompute in backward)
        _backend.served(OP, "sdpa")
        out = _sdpa_run(q, k, v, prefix_k, prefix_v, task_ids, key_padding_mask, bool(causal), scale, dropout_p)
        return _to_layout(out, bshd)
    need_grad = _needs_grad(q, k, v, prefix_k, prefix_v)
    out, _lse, _rng = _prefix_attention_op(
        q, k, v, prefix_k, prefix_v, task_ids, key_padding_mask, bool(causal),
        None if scale is None else float(scale), float(dropout_p), need_grad, bshd,
    )
    return out


def _to_layout(out: Tensor, bshd: bool) -> Tensor:
    """``[B,H,S,D]`` -> contiguous ``[B,H,S,D]`` or ``[B,S,H,D]``."""
    return out.transpose(1, 2).contiguous() if bshd else out.contiguous()


def _drop_empty_prefix(args):
    """A ``P = 0`` prefix is no prefix (the registered op may get one directly)."""
    if args[3] is not None and args[3].shape[-2] == 0:
        return args[:3] + (None, None, None) + args[6:]
    return args


def warmup(
    shapes: Iterable[Sequence[int]],
    dtype: torch.dtype = torch.bfloat16,
    device="cuda",
    *,
    causal: bool = True,
    key_padding_mask: bool = True,
    n_tasks: Optional[int] = None,
    task_ids_dtype: torch.dtype = torch.int64,
    dropout_p: float = 0.0,
    train: bool = True,
    inference: bool = True,
) -> list:
    """Compile (and autotune) now what ``prefix_attention`` will need for ``shapes``, so that no
    first call compiles -- e.g. before CUDA-graph capture, where autotuning cannot run.

    ``shapes``: ``(B, H, Hkv, S, T, P, D)`` tuples. The Triton autotuner keys on the power-of-two
    buckets of ``S`` and ``T`` (>= 16), ``P``, ``D``, dtype, causal, padding mask, bank, dropout;
    kernels do not specialise on ``S``/``T`` themselves, so one shape per (S bucket, T bucket)
    suffices. ``n_tasks``: a bank of that many entries (``task_ids`` of ``task_ids_dtype``), else a
    shared prefix. ``train``: a forward with autograd + backward; ``inference``: a forward under
    ``torch.no_grad`` (another kernel variant: no LSE). The backward compiled is the one of the
    determinism setting in force (fused by default; the split backward under
    ``torch.use_deterministic_algorithms(True)`` / ``PTUNE_FAST_DETERMINISTIC=1``): warm up under
    the setting you train with. Random inputs; nothing is kept.

    Returns one ``(shape, backend)`` per forward run, e.g. to check that Triton served them (on
    CPU the ``sdpa`` backend serves and nothing is compiled).
    """
    served = []
    for shape in shapes:
        B, H, Hkv, S, T, P, D = (int(x) for x in shape)
        g = torch.Generator(device=device).manual_seed(0)

        def rnd(*size):
            return torch.randn(*size, generator=g, device=device, dtype=torch.float32).to(dtype)

        bank = bool(n_tasks) and P > 0
        pshape = (n_tasks, Hkv, P, D) if bank else (Hkv, P, D)
        kw = dict(prefix_k=rnd(*pshape) if P else None, prefix_v=rnd(*pshape) if P else None, causal=causal,
                  task_ids=(torch.arange(B, device=device) % n_tasks).to(task_ids_dtype) if bank else None,
                  key_padding_mask=torch.ones(B, T, dtype=torch.bool, device=device) if key_padding_mask else None,
                  dropout_p=dropout_p)
        for grad in ((True,) if train else ()) + ((False,) if inference else ()):
            q, k, v = rnd(B, H, S, D), rnd(B, Hkv, T, D), rnd(B, Hkv, T, D)
            leaves = [t for t in (q, k, v, kw["prefix_k"], kw["prefix_v"]) if t is not None] if grad else []
            for t in leaves:
                t.requires_grad_(True)
            before = dict(_backend.CALLS)
            with torch.set_grad_enabled(grad):
                out = prefix_attention(q, k, v, **kw)
                if grad:
                    torch.autograd.grad(out, leaves, torch.ones_like(out))
            backend = next((b for (op, b), n in _backend.CALLS.items() if op == OP and n > before.get((op, b), 0)),
                           None)
            served.append((tuple(shape), backend))
            for t in leaves:
                t.requires_grad_(False)
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)
    return served


def select_backend(args, need_grad: bool, phase: str = "forward") -> str:
    """The backend serving ``args`` (the 10 op arguments); counts the call and fallbacks.

    Raises :class:`~ptune_fast._backend.BackendUnavailable` when a forced backend cannot serve."""
    q = args[0]
    forced = _backend.forced_backend()
    order = [forced] if forced else (["cuda", "triton", "sdpa"] if q.is_cuda else ["sdpa"])
    op = OP if phase == "forward" else f"{OP}.{phase}"
    for backend in order:
        if backend == "cuda" and (need_grad or phase != "forward"):
            why = "the CUDA extension has no backward and an input requires grad"
        else:
            why = _BACKENDS[backend][0](*args)
        if why:
            if forced:
                raise _backend.BackendUnavailable(f"{_backend.ENV_VAR}={forced}: {op} cannot run this call: {why}")
            _backend.fallback(op, backend, why)
            continue
        _backend.served(op, backend)
        return backend
    raise AssertionError("the sdpa and reference backends serve every call")  # pragma: no cover


# ------------------------------------------------------------------- torch.library registration


def _empty(q, dtype=None):
    return q.new_empty((0,), dtype=dtype or q.dtype)


@contextlib.contextmanager
def _seeded(rng: Tensor, device: torch.device):
    """Reference-backend dropout: run under torch's generator seeded from ``rng`` (forked, so
    the global stream only advances by the seed draw)."""
    if rng.numel() == 0:
        yield
        return
    seed = int(rng[0].item())
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        if device.type == "cuda":
            torch.cuda.default_generators[device.index if device.index is not None else torch.cuda.current_device()
                                          ].manual_seed(seed)
        else:
            torch.default_generator.manual_seed(seed)
        yield


@contextlib.contextmanager
def _without_saved_tensor_hooks():
    """torch.func refuses to run under saved-tensor hooks (e.g. ``save_on_cpu`` around
    ``backward()``). The recompute's saved tensors are transient and never reach the user's
    hooks anyway, so the hooks are set aside for its duration and restored after."""
    ag = torch._C._autograd
    if not all(hasattr(ag, n) for n in ("_top_saved_tensors_default_hooks", "_pop_saved_tensors_default_hooks",
                                        "_push_saved_tensors_default_hooks")):
        yield
        return
    stack = []
    while (top := ag._top_saved_tensors_default_hooks(True)) is not None:
        stack.append(top)
        ag._pop_saved_tensors_default_hooks()
    try:
        yield
    finally:
        for pack, unpack in reversed(stack):
            ag._push_saved_tensors_default_hooks(pack, unpack)


def _new_rng(q, dropout_p):
    if dropout_p <= 0.0:
        return _empty(q, torch.int64)
    return torch.randint(0, 2**62, (1,), dtype=torch.int64, device=q.device)


@torch.library.custom_op("ptune_fast::prefix_attention", mutates_args=())
def _prefix_attention_op(
    q: Tensor, k: Tensor, v: Tensor, prefix_k: Optional[Tensor], prefix_v: Optional[Tensor],
    task_ids: Optional[Tensor], key_padding_mask: Optional[Tensor], causal: bool, scale: Optional[float],
    dropout_p: float, need_grad: bool, out_bshd: bool = False,
) -> tuple[Tensor, Tensor, Tensor]:
    """Returns ``(out [B,H,S,D] (or [B,S,H,D] with out_bshd), lse [B,H,S] fp32 or [0] when not
    need_grad, rng int64 [1] or [0])``."""
    args = _drop_empty_prefix((q, k, v, prefix_k, prefix_v, task_ids, key_padding_mask, causal, scale, dropout_p))
    backend = select_backend(args, need_grad)
    if backend == "triton":
        from ptune_fast.ops import _prefix_attention_triton as tri

        return tri.forward(*args, need_lse=need_grad, rng=_new_rng(q, dropout_p), out_bshd=out_bshd)
    if backend == "cuda":
        return _to_layout(_cuda_run(*args), out_bshd), _empty(q, torch.float32), _new_rng(q, 0.0)
    if backend == "sdpa":
        rng = _new_rng(q, dropout_p)
        with _seeded(rng, q.device):
            out = _sdpa_run(*args)
        B, H, S, _ = q.shape  # no LSE from SDPA: the backward recomputes (placeholder keeps the shape)
        lse = q.new_zeros((B, H, S), dtype=torch.float32) if need_grad else _empty(q, torch.float32)
        return _to_layout(out, out_bshd), lse, rng
    rng = _new_rng(q, dropout_p)
    with _seeded(rng, q.device):
        out, lse = reference.prefix_attention(*args, return_lse=True)
    return _to_layout(out, out_bshd), (lse.float().contiguous() if need_grad else _empty(q, torch.float32)), rng


@_prefix_attention_op.register_fake
def _prefix_attention_fake(q, k, v, prefix_k, prefix_v, task_ids, key_padding_mask, causal, scale, dropout_p,
                           need_grad, out_bshd=False):
    B, H, S, D = q.shape
    lse = q.new_empty((B, H, S) if need_grad else (0,), dtype=torch.float32)
    out = q.new_empty((B, S, H, D) if out_bshd else (B, H, S, D))
    return out, lse, q.new_empty((1,) if dropout_p > 0.0 else (0,), dtype=torch.int64)


@torch.library.custom_op("ptune_fast::prefix_attention_backward", mutates_args=())
def _prefix_attention_backward_op(
    dout: Tensor, q: Tensor, k: Tensor, v: Tensor, prefix_k: Optional[Tensor], prefix_v: Optional[Tensor],
    task_ids: Optional[Tensor], key_padding_mask: Optional[Tensor], out: Tensor, lse: Tensor, rng: Tensor,
    causal: bool, scale: Optional[float], dropout_p: float, out_bshd: bool = False,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """``(dq, dk, dv, dprefix_k, dprefix_v)``; the prefix grads are ``[0]`` without a prefix and
    zeros of the prefix's shape for a ``P = 0`` prefix. ``dout``/``out`` are in the forward's layout."""
    if out_bshd:  # the kernels take any strides: [B,H,S,D] views of the [B,S,H,D] memory
        dout, out = dout.transpose(1, 2), out.transpose(1, 2)
    pk_in, pv_in = prefix_k, prefix_v
    args = _drop_empty_prefix((q, k, v, prefix_k, prefix_v, task_ids, key_padding_mask, causal, scale, dropout_p))
    empty_prefix = prefix_k is not None and args[3] is None
    backend = select_backend(args, True, phase="backward")
    if backend == "triton":
        from ptune_fast.ops import _prefix_attention_triton as tri

        grads = tri.backward(dout, *args[:7], out, lse, rng, causal, scale, dropout_p)
    else:
        # Recompute + vjp. torch.func works here although the op runs below the Autograd key.
        prefix_k, prefix_v, task_ids = args[3:6]
        has_prefix = prefix_k is not None

        fwd = _sdpa_run if backend == "sdpa" else reference.prefix_attention

        def f(*xs):
            pk, pv = (xs[3], xs[4]) if has_prefix else (None, None)
            return fwd(*xs[:3], pk, pv, task_ids, key_padding_mask, causal, scale, dropout_p)

        wrt = (q, k, v, prefix_k, prefix_v) if has_prefix else (q, k, v)
        with _seeded(rng, q.device), _without_saved_tensor_hooks():
            _, vjp = torch.func.vjp(f, *wrt)
            grads = list(vjp(dout.to(q.dtype))) + ([] if has_prefix else [None, None])
    if empty_prefix:
        grads = (*grads[:3], torch.zeros_like(pk_in), torch.zeros_like(pv_in))
    return tuple(g.contiguous() if g is not None else _empty(q) for g in grads)


@_prefix_attention_backward_op.register_fake
def _prefix_attention_backward_fake(dout, q, k, v, prefix_k, prefix_v, task_ids, key_padding_mask, out, lse, rng,
                                    causal, scale, dropout_p, out_bshd=False):
    pk = prefix_k.new_empty(prefix_k.shape) if prefix_k is not None else q.new_empty((0,))
    pv = prefix_v.new_empty(prefix_v.shape) if prefix_v is not None else q.new_empty((0,))
    return q.new_empty(q.shape), k.new_empty(k.shape), v.new_empty(v.shape), pk, pv


def _setup_context(ctx, inputs, output):
    q, k, v, prefix_k, prefix_v, task_ids, key_padding_mask, causal, scale, dropout_p, _need_grad, bshd = inputs
    out, lse, rng = output
    ctx.save_for_backward(q, k, v, prefix_k, prefix_v, task_ids, key_padding_mask, out, lse, rng)
    ctx.causal, ctx.scale, ctx.dropout_p, ctx.out_bshd = causal, scale, dropout_p, bshd
    ctx.has_prefix = prefix_k is not None


def _backward(ctx, dout, _dlse, _drng):
    q, k, v, prefix_k, prefix_v, task_ids, key_padding_mask, out, lse, rng = ctx.saved_tensors
    if lse.numel() == 0:
        raise RuntimeError(f"{OP}: the forward ran without autograd (need_grad=False); cannot backpropagate")
    dq, dk, dv, dpk, dpv = _prefix_attention_backward_op(
        dout, q, k, v, prefix_k, prefix_v, task_ids, key_padding_mask, out, lse, rng,
        ctx.causal, ctx.scale, ctx.dropout_p, ctx.out_bshd,
    )
    if not ctx.has_prefix:
        dpk = dpv = None
    return dq, dk, dv, dpk, dpv, None, None, None, None, None, None, None


_prefix_attention_op.register_autograd(_backward, setup_context=_setup_context)


# ------------------------------------------------------------------------------ backends
# Each backend is (why_not(*args) -> "" | reason, run(*args) -> out).


def _reference_why_not(*args) -> str:
    return ""


def _reference_run(q, k, v, prefix_k, prefix_v, task_ids, key_padding_mask, causal, scale, dropout_p):
    return reference.prefix_attention(
        q, k, v, prefix_k, prefix_v, task_ids, key_padding_mask, causal, scale, dropout_p
    )


def _sdpa_why_not(*args) -> str:
    return ""


def _sdpa_run(*args):
    from ptune_fast.ops import _prefix_attention_sdpa as sd

    return sd.run(*args)


def _triton_why_not(*args) -> str:
    ok, why = _backend.triton_importable()
    if not ok:
        return why
    from ptune_fast.ops import _prefix_attention_triton as tri

    return tri.why_not(*args)


def _triton_run(*args):
    from ptune_fast.ops import _prefix_attention_triton as tri

    return tri.run(*args)


def _cuda_why_not(q, k, v, prefix_k, prefix_v, task_ids, key_padding_mask, causal, scale, dropout_p) -> str:
    ext, why = _backend.cuda_extension()
    if ext is None:
        return why
    return _dec.why_not(q, k, v, prefix_k, prefix_v, task_ids, key_padding_mask, causal, scale, dropout_p)


def _cuda_run(*args):
    return _dec.run(*args)


_BACKENDS = {
    "reference": (_reference_why_not, _reference_run),
    "sdpa": (_sdpa_why_not, _sdpa_run),
    "triton": (_triton_why_not, _triton_run),
    "cuda": (_cuda_why_not, _cuda_run),
}
