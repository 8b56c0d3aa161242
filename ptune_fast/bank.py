"""``TaskBank``: one frozen Hugging Face model serving N prompt-learning adapters at once.

Each row of a batch names its task; every layer attends to that task's prefix through the
kernels' per-row task index (a prefix bank ``[N, Hkv, P, D]``), in ``forward`` and
``generate``. Any mix of prefix tuning, P-Tuning v2 and (deep-folded) prompt / P-tuning works,
as long as the tasks share the number of virtual tokens P (the rows' positions start at P).
Adding or removing a task leaves the others untouched.

Positions follow PEFT per row: prefix-tuning rows shift explicit ``position_ids`` (those
``generate`` derives from the padding) by P; prompt / P-tuning rows ignore them, as PEFT does
for prompt methods, and take the model's own positions after the P virtual tokens.

Threads: a bank serialises its calls. ``forward``, ``generate``, ``fold`` and every task
change hold one re-entrant lock for the whole call, because the per-call task index lives in
the bank's (shared) prefix state; calls from several threads are therefore safe and each
gets its own tasks, but they do not run concurrently. Calling ``bank.model`` directly from
another thread while a bank call runs is not protected.

Failures change nothing: a constructor, ``add_task``, ``from_pretrained``, ``from_peft`` or
``fold`` that raises leaves the base model (attention implementation, hooks, ``requires_grad``)
and the bank as they were.

The single-task constructors :func:`prefix_tuning`, :func:`p_tuning`, :func:`prompt_tuning`
are the way to use ptune_fast without PEFT: they return a one-task bank.
"""
from __future__ import annotations

import threading
from typing import Any, Dict, Optional, Sequence, Union

import torch
from torch import nn

from ptune_fast.adapter import PromptAdapter
from ptune_fast.integrations.core import attach_prefix, backbone_of
from ptune_fast.integrations.shared_pass import causal_lm_loss, first_logits
from ptune_fast.integrations.state import PrefixState

Tasks = Union[None, str, Sequence[str], torch.Tensor]


def _check_positive_int(name: str, value, optional: bool = False) -> None:
    if optional and value is None:
        return
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise ValueError(f"{name} must be a positive int{' or None' if optional else ''}, got {value!r}")


def _check_task_name(name) -> None:
    if not isinstance(name, str) or not name or "." in name:
        raise ValueError(f"task name must be a non-empty string without '.', got {name!r}")


def _weights_differ(a: nn.Module, b: nn.Module) -> Optional[str]:
    """None if ``a`` and ``b`` hold the same tensors, else the first differing name."""
    if a is b:
        return None
    sa, sb = a.state_dict(), b.state_dict()
    if sa.keys() != sb.keys():
        return f"parameter names ({sorted(set(sa) ^ set(sb))[:3]} ...)"
    for k, v in sa.items():
        w = sb[k]
        if v.shape != w.shape or v.dtype != w.dtype or not torch.equal(v, w.to(v.device)):
            return k
    return None


class TaskBank(nn.Module):
    """A frozen ``hf_model`` plus named :class:`PromptAdapter` s (see the module docstring)."""

    def __init__(self, hf_model, adapters: Optional[Dict[str, PromptAdapter]] = None, freeze_base: bool = True):
        super().__init__()
        adapters = dict(adapters or {})
        self.model = hf_model
        self.tasks = nn.ModuleDict()
        self.state = PrefixState(self._provider, self._adapter_parameters, 0)
        self._attachment = None
        self._lock = threading.RLock()
        self._add_tasks(adapters)  # validates everything before it changes anything
        if freeze_base:
            for p in hf_model.parameters():
                p.requires_grad_(False)

    # The backbone is derived, not registered: the bank's state_dict holds the base model once.
    @property
    def _backbone(self):
        return backbone_of(self.model)

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        for key in [k for k in state_dict if k.startswith(prefix + "_backbone.")]:
            del state_dict[key]  # state dicts of older banks held the backbone a second time
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def __getstate__(self):
        state = self.__dict__.copy()
        state.pop("_lock", None)
        return state

    def __setstate__(self, state):
        super().__setstate__(state)
        self._lock = threading.RLock()

    # ------------------------------------------------------------------ tasks
    @property
    def task_names(self):
        return list(self.tasks.keys())

    def _check_new_task(self, name, adapter, P: Optional[int]) -> int:
        _check_task_name(name)
        if name in self.tasks:
            raise ValueError(f"task {name!r} already exists; remove_task() it first")
        if not isinstance(adapter, PromptAdapter):
            raise TypeError(f"adapter for task {name!r} must be a PromptAdapter, got {type(adapter).__name__}")
        _check_positive_int(f"num_virtual_tokens of task {name!r}", adapter.num_virtual_tokens)
        adapter.check_model(self.model)
        if P is not None and adapter.num_virtual_tokens != P:
            raise ValueError(
                f"task {name!r} has {adapter.num_virtual_tokens} virtual tokens but this bank serves "
                f"P={P}: all tasks of a bank share P"
            )
        return adapter.num_virtual_tokens

    def _add_tasks(self, adapters: Dict[str, PromptAdapter]) -> None:
        with self._lock:
            P = self.state.num_virtual_tokens if len(self.tasks) else None
            for name, adapter in adapters.items():
                P = self._check_new_task(name, adapter, P)
            if not adapters:
                return
            if self._attachment is None:  # raises, changing nothing, if the model is already served
                self._attachment = attach_prefix(self.model, self.state)
            device = next(self.model.parameters()).device
            for name, adapter in adapters.items():
                self.tasks[name] = adapter.to(device)
            self.state.num_virtual_tokens = P
            self._tasks_changed()

    def add_task(self, name: str, adapter: PromptAdapter) -> "TaskBank":
        self._add_tasks({name: adapter})
        return self

    def remove_task(self, name: str) -> PromptAdapter:
        with self._lock:
            if name not in self.tasks:
                raise KeyError(f"no task {name!r}; tasks: {self.task_names}")
            adapter = self.tasks[name]
            del self.tasks[name]
            if not len(self.tasks):
                self.detach()
            else:
                self._tasks_changed()
            return adapter

    def attach(self) -> "TaskBank":
        """Serve the tasks on the base model again after :meth:`detach` (no-op if attached)."""
        with self._lock:
            if self._attachment is None and len(self.tasks):
                self._attachment = attach_prefix(self.model, self.state)
                self._tasks_changed()
            return self

    def _check_attached(self):
        if self._attachment is None and len(self.tasks):
            raise RuntimeError("this TaskBank was detached from its model (detach()): its tasks would be ignored; "
                               "call bank.attach() first")

    def detach(self):
        """Give the base model back as it was (attention implementation, hooks); a detached
        bank refuses calls until :meth:`attach`."""
        with self._lock:
            if self._attachment is not None:
                self._attachment.remove()
                self._attachment = None
            self._invalidate()
            return self.model

    def _invalidate(self):
        self.state.clear()

    def _tasks_changed(self):
        self._invalidate()
        if self._attachment is not None:
            self._attachment.ignore_position_ids = self._position_policy()

    def _position_policy(self):
        """PEFT's position rule per task: prompt methods ignore explicit ``position_ids``
        (True), prefix tuning shifts them by P (False); a mixed bank needs one flag per task
        (bool ``[N]``, indexed by the rows' task ids in the attachment)."""
        prompt = [a.method != "prefix_tuning" for a in self.tasks.values()]
        if all(prompt) or not any(prompt):
            return bool(prompt and prompt[0])
        return torch.tensor(prompt, dtype=torch.bool, device=next(self.model.parameters()).device)

    def _adapter_parameters(self):
        return [p for a in self.tasks.values() for p in a.parameters()]

    def _provider(self):
        dtype = self.model.dtype
        backbone = self._backbone
        ks, vs, last = [], [], []
        for adapter in self.tasks.values():
            k, v = adapter.kv(self.model, backbone, self.state, dtype)
            ks.append(k)
            vs.append(v)
            last.append(dict(self.state.extra) if adapter.method != "prefix_tuning" else None)
        self.state.extra["first_per_task"] = last
        if len(ks) == 1:
            return ks[0].contiguous(), vs[0].contiguous()
        return torch.stack(ks, dim=1), torch.stack(vs, dim=1)  # [L, N, Hkv, P, D]

    def task_index(self, tasks: Tasks, batch: int, device) -> Optional[torch.Tensor]:
        """Row -> bank index (int32 ``[B]``), or None for a single-task bank. Validated on the
        host: names must be known, integer indices in ``[0, N)``."""
        names = self.task_names
        if not names:
            raise RuntimeError("the bank holds no task")
        if tasks is None:
            if len(names) == 1:
                return None
            raise ValueError(f"tasks: this bank holds {len(names)} tasks ({names}); name one per row")
        if isinstance(tasks, str):
            tasks = [tasks] * batch
        if isinstance(tasks, torch.Tensor):
            if tasks.dtype == torch.bool or tasks.is_floating_point() or tasks.is_complex():
                raise TypeError(f"tasks: expected an integer tensor of task indices, got dtype {tasks.dtype}")
            if tuple(tasks.shape) != (batch,):
                raise ValueError(f"tasks must name one task per row ({batch}), got shape {tuple(tasks.shape)}")
            host = tasks.detach().to("cpu", torch.int64)
            bad = host[(host < 0) | (host >= len(names))]
            if bad.numel():
                raise ValueError(f"tasks: task indices {sorted(set(bad.tolist()))} are out of range: this bank "
                                 f"holds {len(names)} tasks, indices 0..{len(names) - 1} = {names}")
            idx = tasks.to(device=device, dtype=torch.int32)
        else:
            tasks = list(tasks)
            wrong = [t for t in tasks if not isinstance(t, str)]
            if wrong:
                raise TypeError(f"tasks: expected task names (str) or an integer tensor, got {wrong[:3]}")
            unknown = [t for t in tasks if t not in self.tasks]
            if unknown:
                raise ValueError(f"tasks: unknown task names {unknown}; known: {names}")
            if len(tasks) != batch:
                raise ValueError(f"tasks must name one task per row ({batch}), got {len(tasks)}")
            idx = torch.tensor([names.index(t) for t in tasks], dtype=torch.int32, device=device)
        if len(names) == 1:
            return None
        return idx

    # ------------------------------------------------------------------ running
    def _batch(self, input_ids, inputs_embeds):
        x = input_ids if input_ids is not None else inputs_embeds
        if x is None:
            raise ValueError("pass input_ids or inputs_embeds")
        return x.shape[0], x.device

    def forward(self, input_ids=None, attention_mask=None, inputs_embeds=None, labels=None, tasks: Tasks = None,
                **kwargs):
        B, device = self._batch(input_ids, inputs_embeds)
        with self._lock:
            self._check_attached()
            # left set after the call: checkpointed layers re-read it when backward recomputes them
            self.state.task_ids = self.task_index(tasks, B, device)
            prompt_rows = self._prompt_rows()
            causal_lm = hasattr(self.model, "get_output_embeddings") and self.model.get_output_embeddings() is not None
            own_loss = labels is not None and causal_lm and prompt_rows is not None
            return_dict = kwargs.pop("return_dict", None)
            out = self.model(input_ids=input_ids, attention_mask=attention_mask, inputs_embeds=inputs_embeds,
                             labels=None if own_loss else labels, return_dict=True, **kwargs)
            if own_loss:
                out.loss = self._causal_lm_loss(out.logits, labels, prompt_rows)
        return out if return_dict is not False else out.to_tuple()

    def _prompt_rows(self):
        methods = [a.method != "prefix_tuning" for a in self.tasks.values()]
        return None if not any(methods) else torch.tensor(methods)

    def _causal_lm_loss(self, logits, labels, prompt_tasks):
        """PEFT's loss for prompt methods predicts each row's first token from the last virtual
        token; prefix-tuning rows have no such term."""
        V = logits.shape[-1]
        zero = logits.new_zeros(V)
        first = torch.stack([zero if e is None else first_logits(self.model, e).to(zero.dtype)
                             for e in self.state.extra["first_per_task"]])  # [N, V]
        B = logits.shape[0]
        tids = self.state.task_ids
        tids = torch.zeros(B, dtype=torch.long, device=logits.device) if tids is None else tids.long()
        return causal_lm_loss(self.model, logits, labels, first[tids], prompt_tasks.to(logits.device)[tids])

    @torch.no_grad()
    def generate(self, *args, tasks: Tasks = None, **kwargs):
        ids = kwargs.get("input_ids", args[0] if args else None)
        B, device = self._batch(ids, kwargs.get("inputs_embeds"))
        with self._lock:
            self._check_attached()
            self.state.task_ids = self.task_index(tasks, B, device)
            try:
                return self.model.generate(*args, **kwargs)
            finally:
                self.state.task_ids = None

    # ------------------------------------------------------------------ folding and files
    def fold(self, deep: Optional[bool] = None) -> dict:
        """Fold every task (see :meth:`PromptAdapter.fold`); ``deep`` defaults to True for
        prompt methods (they run on causal decoders); a prefix-tuning task's folded table
        already is its per-layer K/V, so ``deep`` changes nothing there. All or nothing: if
        one task fails, every task is put back as it was. Returns a report per task."""
        if deep not in (None, True, False):
            raise TypeError(f"deep must be None, True or False, got {deep!r}")
        with self._lock:
            slots = ("encoder",) + ("static_tokens", "static_keys", "static_values", "static_last_hidden", "static_first_logits")
            saved = {name: {s: getattr(a, s) for s in slots} for name, a in self.tasks.items()}
            report = {}
            try:
                for name, adapter in self.tasks.items():
                    d = adapter.method != "prefix_tuning" if deep is None else deep
                    report[name] = adapter.fold(self.model, self._backbone, deep=d)
            except BaseException:
                for name, values in saved.items():
                    for s, v in values.items():
                        setattr(self.tasks[name], s, v)
                raise
            finally:
                self._invalidate()
            return report

    def save_pretrained(self, directory: str, tasks: Optional[Sequence[str]] = None) -> None:
        from ptune_fast import io

        names = list(self.task_names if tasks is None else tasks)
        unknown = [t for t in names if t not in self.tasks]
        if unknown:
            raise ValueError(f"tasks: unknown task names {unknown}; known: {self.task_names}")
        for name in names:
            io.save_adapter(self.tasks[name], f"{directory}/{name}")

    def load_task(self, name: str, path: str) -> "TaskBank":
        """Load one task from a ptune_fast adapter directory or a PEFT adapter directory;
        on any error the bank is left as it was."""
        from ptune_fast import io

        _check_task_name(name)
        return self.add_task(name, io.load_adapter(path, self.model))

    @classmethod
    def from_pretrained(cls, hf_model, paths: Dict[str, str]) -> "TaskBank":
        """A bank of the adapters in ``paths`` (task name -> ptune_fast or PEFT adapter
        directory). Every file is read and checked before ``hf_model`` is touched: on any
        error ``hf_model`` is exactly as before."""
        from ptune_fast import io

        if not isinstance(paths, dict):
            raise TypeError(f"paths must be a dict of task name -> adapter directory, got {type(paths).__name__}")
        adapters = {}
        for name, path in paths.items():
            _check_task_name(name)
            try:
                adapters[name] = io.load_adapter(path, hf_model)
            except ValueError as exc:
                raise ValueError(f"paths[{name!r}]: {exc}") from exc
        return cls(hf_model, adapters)

    @classmethod
    def from_peft(cls, peft_models: Dict[str, Any], hf_model=None, fold: bool = False) -> "TaskBank":
        """A bank of the active prompt-learning adapters of ``peft_models`` (task name ->
        ``peft.PeftModel``; prefix tuning, P-Tuning v2, P-tuning, prompt tuning), whose base
        models must hold the same weights. The adapters are copied (see
        :func:`ptune_fast.io.adapter_from_peft`): trainable encoders stay trainable.

        ``hf_model`` (default: the first PeftModel's base model) is the model the bank serves;
        while the bank is attached, the PeftModel that wraps it must not be called on its own
        (pass a separate copy to keep using it). ``fold=True`` folds every task at once
        (prompt / P-tuning deep-folded, see :meth:`fold`). On any error nothing is changed."""
        from ptune_fast import io

        if not isinstance(peft_models, dict) or not peft_models:
            raise TypeError("peft_models must be a non-empty dict of task name -> peft.PeftModel")
        if fold not in (True, False):
            raise TypeError(f"fold must be True or False, got {fold!r}")
        adapters = {}
        for name, pm in peft_models.items():
            _check_task_name(name)
            try:
                adapters[name] = io.adapter_from_peft(pm)
            except (TypeError, ValueError) as exc:
                raise type(exc)(f"peft_models[{name!r}]: {exc}") from exc
        base = hf_model if hf_model is not None else next(iter(peft_models.values())).get_base_model()
        for name, pm in peft_models.items():
            differ = _weights_differ(base, pm.get_base_model())
            if differ is not None:
                raise ValueError(f"peft_models[{name!r}]: its base model's weights differ from the bank's model "
                                 f"at {differ}; every task of a bank must share one base model")
        bank = cls(base, adapters)
        if fold:
            bank.fold()
        return bank


def _single(hf_model, adapter: PromptAdapter) -> TaskBank:
    return TaskBank(hf_model, {"default": adapter})


def prefix_tuning(hf_model, num_virtual_tokens: int, prefix_projection: bool = False,
                  encoder_hidden_size: Optional[int] = None, init: str = "normal") -> TaskBank:
    """Prefix tuning (``prefix_projection=True``) or P-Tuning v2 on a plain transformers model."""
    _check_positive_int("num_virtual_tokens", num_virtual_tokens)
    _check_positive_int("encoder_hidden_size", encoder_hidden_size, optional=True)
    return _single(hf_model, PromptAdapter.prefix_tuning(hf_model, num_virtual_tokens, prefix_projection,
                                                         encoder_hidden_size, init))


def p_tuning(hf_model, num_virtual_tokens: int, encoder_type: str = "MLP",
             encoder_hidden_size: Optional[int] = None, encoder_num_layers: int = 2) -> TaskBank:
    """P-tuning (v1) with an MLP or biLSTM prompt encoder, on a causal decoder."""
    _check_positive_int("num_virtual_tokens", num_virtual_tokens)
    _check_positive_int("encoder_hidden_size", encoder_hidden_size, optional=True)
    _check_positive_int("encoder_num_layers", encoder_num_layers)
    return _single(hf_model, PromptAdapter.p_tuning(hf_model, num_virtual_tokens, encoder_type,
                                                    encoder_hidden_size, encoder_num_layers))


def prompt_tuning(hf_model, num_virtual_tokens: int, init: str = "random", init_token_ids=None,
                  init_text=None, tokenizer=None) -> TaskBank:
    """Prompt tuning on a causal decoder (init: random, sample_vocab, or text via init_token_ids or
    init_text + tokenizer)."""
    _check_positive_int("num_virtual_tokens", num_virtual_tokens)
    return _single(hf_model, PromptAdapter.prompt_tuning(hf_model, num_virtual_tokens, init, init_token_ids,
                                                         init_text, tokenizer))
