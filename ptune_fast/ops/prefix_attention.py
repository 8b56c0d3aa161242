"""``prefix_attention``: attention over ``[prefix ; sequence]`` without expanding or
concatenating the prefix. Public op, input checks, backend dispatch, ``torch.library``
registration (``ptune_fast::prefix_attention`` + its backward) and autograd.

Backends (see :mod:`ptune_fast._backend`):

* ``cuda``      -- ``ptune_fast._C`` decode kernel (1..8 query tokens, no autograd, fp16/bf16);
  skipped whenever an input requires grad;
* ``triton``    -- fused flash-attention forward/backward (``_prefix_attention_triton``);
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
    out               [B, H,   S, D]   in q.dtype

Causal alignment is bottom-right: query ``i`` sits at sequence position ``T - S + i``. P = 2,
T = 4, S = 2::

              prefix | sequence
              p0 p1  | t0 t1 t2 t3
    q0 (t2)    x  x  |  x  x  x  .
    q1 (t3)    x  x  |  x  x  x  x

The backend is chosen *inside* the registered op (opaque to ``torch.compile``: no graph break
at the call, and the env var ``PTUNE_FAST_BACKEND`` / the counters are read at run time).
The backward re-runs the same choice (a forced backend must be forced for both).
"""

import contextlib
from typing import Optional

import torch

from ptune_fast import _backend, reference

OP = "prefix_attention"
Tensor = torch.Tensor


def check_inputs(q, k, v, prefix_k, prefix_v, task_ids, key_padding_mask, causal, dropout_p):
    """Validate shapes/dtypes; raise ValueError/TypeError naming the argument."""
    for name, t in (("q", q), ("k", k), ("v", v)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
        if t.dim() != 4:
            raise ValueError(f"{name} must be 4-D ([B, H, S, D] / [B, Hkv, T, D]), got shape {tuple(t.shape)}")
    B, H, S, D = q.shape
    if k.shape != v.shape:
        raise ValueError(f"k and v must have the same shape, got {tuple(k.shape)} and {tuple(v.shape)}")
    if k.shape[0] != B or k.shape[3] != D:
        raise ValueError(f"k must be [B={B}, Hkv, T, D={D}], got {tuple(k.shape)}")
    Hkv, T = k.shape[1], k.shape[2]
    if Hkv == 0 or H % Hkv:
        raise ValueError(f"q heads ({H}) must be a multiple of k/v heads ({Hkv})")
    if S < 1:
        raise ValueError(f"q must hold at least one query (S >= 1), got S={S}")
    if causal and T < S:
        raise ValueError(f"causal attention needs T >= S (k holds the cache + the new tokens), got T={T}, S={S}")
    if not q.dtype.is_floating_point or k.dtype != q.dtype or v.dtype != q.dtype:
        raise TypeError(f"q, k, v must share one floating dtype, got {q.dtype}, {k.dtype}, {v.dtype}")
    if (prefix_k is None) != (prefix_v is None):
        raise ValueError("prefix_k and prefix_v must be given together")
    if prefix_k is not None:
        if prefix_k.shape != prefix_v.shape:
            raise ValueError(
                f"prefix_k and prefix_v must have the same shape, got {tuple(prefix_k.shape)} and {tuple(prefix_v.shape)}"
            )
        if prefix_k.dim() not in (3, 4) or prefix_k.shape[-3] != Hkv or prefix_k.shape[-1] != D:
            raise ValueError(
                f"prefix_k must be [Hkv={Hkv}, P, D={D}] (shared) or [N, Hkv={Hkv}, P, D={D}] (bank), "
                f"got {tuple(prefix_k.shape)}"
            )
        if prefix_k.dtype != q.dtype or prefix_v.dtype != q.dtype:
            raise TypeError(f"prefix_k/prefix_v dtype must equal q's ({q.dtype}), got {prefix_k.dtype}")
        if prefix_k.dim() == 4:
            if task_ids is None:
                raise ValueError("task_ids [B] is required when prefix_k is a bank [N, Hkv, P, D]")
            if task_ids.shape != (B,) or task_ids.dtype not in (torch.int32, torch.int64):
                raise ValueError(
                    f"task_ids must be an int32/int64 tensor of shape [B={B}], got {task_ids.dtype} {tuple(task_ids.shape)}"
                )
        elif task_ids is not None:
            raise ValueError("task_ids is only meaningful with a prefix bank [N, Hkv, P, D]")
    elif task_ids is not None:
        raise ValueError("task_ids given without a prefix")
    if key_padding_mask is not None and tuple(key_padding_mask.shape) != (B, T):
        raise ValueError(f"key_padding_mask must be [B={B}, T={T}] (True = real token), got {tuple(key_padding_mask.shape)}")
    if not 0.0 <= dropout_p < 1.0:
        raise ValueError(f"dropout_p must be in [0, 1), got {dropout_p}")


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
) -> torch.Tensor:
    """Attention of ``q [B,H,S,D]`` over ``[prefix ; k/v]``; returns ``out [B,H,S,D]`` (q.dtype).

    See the module docstring for layouts and the bottom-right causal alignment; semantics are
    exactly :func:`ptune_fast.reference.prefix_attention`'s (prefix always visible, GQA by
    ``h // (H // Hkv)``, rows with no visible key output 0). ``scale`` defaults to ``D**-0.5``.
    ``dropout_p > 0`` drops softmax probabilities (pass 0 in eval); the mask is reproducible from
    torch's generator (``torch.manual_seed``) but differs between the Triton and reference backends.
    Differentiable in q, k, v, prefix_k, prefix_v (a shared prefix gets the sum over rows, a bank
    one gradient per entry). Works under ``torch.compile(fullgraph=True)``.
    """
    check_inputs(q, k, v, prefix_k, prefix_v, task_ids, key_padding_mask, causal, dropout_p)
    if prefix_k is not None and prefix_k.shape[-2] == 0:
        prefix_k = prefix_v = task_ids = None
    if not torch.compiler.is_compiling() and not q.is_cuda and _backend.forced_backend() in (None, "sdpa"):
        # eager CPU: PyTorch's fused SDPA with its native autograd (no recompute in backward)
        _backend.served(OP, "sdpa")
        return _sdpa_run(q, k, v, prefix_k, prefix_v, task_ids, key_padding_mask, bool(causal), scale, dropout_p)
    need_grad = _needs_grad(q, k, v, prefix_k, prefix_v)
    out, _lse, _rng = _prefix_attention_op(
        q, k, v, prefix_k, prefix_v, task_ids, key_padding_mask, bool(causal),
        None if scale is None else float(scale), float(dropout_p), need_grad,
    )
    return out


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
    dropout_p: float, need_grad: bool,
) -> tuple[Tensor, Tensor, Tensor]:
    """Returns ``(out [B,H,S,D], lse [B,H,S] fp32 or [0] when not need_grad, rng int64 [1] or [0])``."""
    args = (q, k, v, prefix_k, prefix_v, task_ids, key_padding_mask, causal, scale, dropout_p)
    backend = select_backend(args, need_grad)
    if backend == "triton":
        from ptune_fast.ops import _prefix_attention_triton as tri

        return tri.forward(*args, need_lse=need_grad, rng=_new_rng(q, dropout_p))
    if backend == "cuda":
        return _cuda_run(*args).contiguous(), _empty(q, torch.float32), _new_rng(q, 0.0)
    if backend == "sdpa":
        rng = _new_rng(q, dropout_p)
        with _seeded(rng, q.device):
            out = _sdpa_run(*args)
        B, H, S, _ = q.shape  # no LSE from SDPA: the backward recomputes (placeholder keeps the shape)
        lse = q.new_zeros((B, H, S), dtype=torch.float32) if need_grad else _empty(q, torch.float32)
        return out.contiguous(), lse, rng
    rng = _new_rng(q, dropout_p)
    with _seeded(rng, q.device):
        out, lse = reference.prefix_attention(*args, return_lse=True)
    return out.contiguous(), (lse.float().contiguous() if need_grad else _empty(q, torch.float32)), rng


@_prefix_attention_op.register_fake
def _prefix_attention_fake(q, k, v, prefix_k, prefix_v, task_ids, key_padding_mask, causal, scale, dropout_p,
                           need_grad):
    B, H, S, _ = q.shape
    lse = q.new_empty((B, H, S) if need_grad else (0,), dtype=torch.float32)
    return q.new_empty(q.shape), lse, q.new_empty((1,) if dropout_p > 0.0 else (0,), dtype=torch.int64)


@torch.library.custom_op("ptune_fast::prefix_attention_backward", mutates_args=())
def _prefix_attention_backward_op(
    dout: Tensor, q: Tensor, k: Tensor, v: Tensor, prefix_k: Optional[Tensor], prefix_v: Optional[Tensor],
    task_ids: Optional[Tensor], key_padding_mask: Optional[Tensor], out: Tensor, lse: Tensor, rng: Tensor,
    causal: bool, scale: Optional[float], dropout_p: float,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """``(dq, dk, dv, dprefix_k, dprefix_v)``; the prefix grads are ``[0]`` without a prefix."""
    args = (q, k, v, prefix_k, prefix_v, task_ids, key_padding_mask, causal, scale, dropout_p)
    backend = select_backend(args, True, phase="backward")
    if backend == "triton":
        from ptune_fast.ops import _prefix_attention_triton as tri

        grads = tri.backward(dout, *args[:7], out, lse, rng, causal, scale, dropout_p)
    else:
        # Recompute + vjp. torch.func works here although the op runs below the Autograd key.
        has_prefix = prefix_k is not None

        fwd = _sdpa_run if backend == "sdpa" else reference.prefix_attention

        def f(*xs):
            pk, pv = (xs[3], xs[4]) if has_prefix else (None, None)
            return fwd(*xs[:3], pk, pv, task_ids, key_padding_mask, causal, scale, dropout_p)

        wrt = (q, k, v, prefix_k, prefix_v) if has_prefix else (q, k, v)
        with _seeded(rng, q.device), _without_saved_tensor_hooks():
            _, vjp = torch.func.vjp(f, *wrt)
            grads = list(vjp(dout.to(q.dtype))) + ([] if has_prefix else [None, None])
    return tuple(g.contiguous() if g is not None else _empty(q) for g in grads)


@_prefix_attention_backward_op.register_fake
def _prefix_attention_backward_fake(dout, q, k, v, prefix_k, prefix_v, task_ids, key_padding_mask, out, lse, rng,
                                    causal, scale, dropout_p):
    pk = prefix_k.new_empty(prefix_k.shape) if prefix_k is not None else q.new_empty((0,))
    pv = prefix_v.new_empty(prefix_v.shape) if prefix_v is not None else q.new_empty((0,))
    return q.new_empty(q.shape), k.new_empty(k.shape), v.new_empty(v.shape), pk, pv


def _setup_context(ctx, inputs, output):
    q, k, v, prefix_k, prefix_v, task_ids, key_padding_mask, causal, scale, dropout_p, _need_grad = inputs
    out, lse, rng = output
    ctx.save_for_backward(q, k, v, prefix_k, prefix_v, task_ids, key_padding_mask, out, lse, rng)
    ctx.causal, ctx.scale, ctx.dropout_p = causal, scale, dropout_p
    ctx.has_prefix = prefix_k is not None


def _backward(ctx, dout, _dlse, _drng):
    q, k, v, prefix_k, prefix_v, task_ids, key_padding_mask, out, lse, rng = ctx.saved_tensors
    if lse.numel() == 0:
        raise RuntimeError(f"{OP}: the forward ran without autograd (need_grad=False); cannot backpropagate")
    dq, dk, dv, dpk, dpv = _prefix_attention_backward_op(
        dout, q, k, v, prefix_k, prefix_v, task_ids, key_padding_mask, out, lse, rng,
        ctx.causal, ctx.scale, ctx.dropout_p,
    )
    if not ctx.has_prefix:
        dpk = dpv = None
    return dq, dk, dv, dpk, dpv, None, None, None, None, None, None


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
    from ptune_fast.ops import decode_attention as dec

    return dec.why_not(q, k, v, prefix_k, prefix_v, task_ids, key_padding_mask, causal, scale, dropout_p)


def _cuda_run(*args):
    from ptune_fast.ops import decode_attention as dec

    return dec.run(*args)


_BACKENDS = {
    "reference": (_reference_why_not, _reference_run),
    "sdpa": (_sdpa_why_not, _sdpa_run),
    "triton": (_triton_why_not, _triton_run),
    "cuda": (_cuda_why_not, _cuda_run),
}
