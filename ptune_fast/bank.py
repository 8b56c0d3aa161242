"""``TaskBank``: one frozen Hugging Face model serving N prompt-learning adapters at once.

Each row of a batch names its task; every layer attends to that task's prefix through the
kernels' per-row task index (a prefix bank ``[N, Hkv, P, D]``), in ``forward`` and
``generate``. Any mix of prefix tuning, P-Tuning v2 and (deep-folded) prompt / P-tuning works,
as long as the tasks share the number of virtual tokens P (the rows' positions start at P).
Adding or removing a task leaves the others untouched.

The single-task constructors :func:`prefix_tuning`, :func:`p_tuning`, :func:`prompt_tuning`
are the way to use ptune_fast without PEFT: they return a one-task bank.
"""
from __future__ import annotations

from typing import Dict, Optional, Sequence, Union

import torch
from torch import nn

from ptune_fast.adapter import PromptAdapter
from ptune_fast.integrations.core import attach_prefix, backbone_of
from ptune_fast.integrations.shared_pass import causal_lm_loss
from ptune_fast.integrations.state import PrefixState

Tasks = Union[None, str, Sequence[str], torch.Tensor]


class TaskBank(nn.Module):
    """A frozen ``hf_model`` plus named :class:`PromptAdapter` s (see the module docstring)."""

    def __init__(self, hf_model, adapters: Optional[Dict[str, PromptAdapter]] = None, freeze_base: bool = True):
        super().__init__()
        self.model = hf_model
        self.tasks = nn.ModuleDict()
        if freeze_base:
            for p in hf_model.parameters():
                p.requires_grad_(False)
        self._backbone = backbone_of(hf_model)
        self.state = PrefixState(self._provider, self._adapter_parameters, 0)
        self._attachment = None
        for name, adapter in (adapters or {}).items():
            self.add_task(name, adapter)

    # ------------------------------------------------------------------ tasks
    @property
    def task_names(self):
        return list(self.tasks.keys())

    def add_task(self, name: str, adapter: PromptAdapter) -> "TaskBank":
        if not isinstance(name, str) or not name or "." in name:
            raise ValueError(f"task name must be a non-empty string without '.', got {name!r}")
        if name in self.tasks:
            raise ValueError(f"task {name!r} already exists; remove_task() it first")
        if not isinstance(adapter, PromptAdapter):
            raise TypeError(f"adapter must be a PromptAdapter, got {type(adapter).__name__}")
        adapter.check_model(self.model)
        if len(self.tasks) and adapter.num_virtual_tokens != self.state.num_virtual_tokens:
            raise ValueError(
                f"task {name!r} has {adapter.num_virtual_tokens} virtual tokens but this bank serves "
                f"P={self.state.num_virtual_tokens}: all tasks of a bank share P"
            )
        self.tasks[name] = adapter.to(next(self.model.parameters()).device)
        self.state.num_virtual_tokens = adapter.num_virtual_tokens
        self._invalidate()
        if self._attachment is None:
            self._attachment = attach_prefix(self.model, self.state)
        return self

    def remove_task(self, name: str) -> PromptAdapter:
        if name not in self.tasks:
            raise KeyError(f"no task {name!r}; tasks: {self.task_names}")
        adapter = self.tasks[name]
        del self.tasks[name]
        self._invalidate()
        if not len(self.tasks):
            self.detach()
        return adapter

    def detach(self):
        """Give the base model back as it was (attention implementation, hooks)."""
        if self._attachment is not None:
            self._attachment.remove()
            self._attachment = None
        return self.model

    def _invalidate(self):
        self.state.clear()

    def _adapter_parameters(self):
        return [p for a in self.tasks.values() for p in a.parameters()]

    def _provider(self):
        dtype = self.model.dtype
        ks, vs, last = [], [], []
        for adapter in self.tasks.values():
            k, v = adapter.kv(self.model, self._backbone, self.state, dtype)
            ks.append(k)
            vs.append(v)
            last.append(self.state.extra.get("last_hidden"))
        self.state.extra["last_hidden_per_task"] = last
        if len(ks) == 1:
            return ks[0].contiguous(), vs[0].contiguous()
        return torch.stack(ks, dim=1), torch.stack(vs, dim=1)  # [L, N, Hkv, P, D]

    def task_index(self, tasks: Tasks, batch: int, device) -> Optional[torch.Tensor]:
        """Row -> bank index (int32 ``[B]``), or None for a single-task bank."""
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
            idx = tasks.to(device=device, dtype=torch.int32)
        else:
            unknown = [t for t in tasks if t not in self.tasks]
            if unknown:
                raise ValueError(f"tasks: unknown task names {unknown}; known: {names}")
            idx = torch.tensor([names.index(t) for t in tasks], dtype=torch.int32, device=device)
        if idx.shape != (batch,):
            raise ValueError(f"tasks must name one task per row ({batch}), got {tuple(idx.shape)}")
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
        last = self.state.extra["last_hidden_per_task"]
        hidden_size = self.model.get_output_embeddings().weight.shape[1]
        zero = logits.new_zeros(hidden_size)
        hidden = torch.stack([zero if h is None else h.to(zero.dtype) for h in last])  # [N, hidden]
        B = logits.shape[0]
        tids = self.state.task_ids
        tids = torch.zeros(B, dtype=torch.long, device=logits.device) if tids is None else tids.long()
        return causal_lm_loss(self.model, logits, labels, hidden[tids], prompt_tasks.to(logits.device)[tids])

    @torch.no_grad()
    def generate(self, *args, tasks: Tasks = None, **kwargs):
        ids = kwargs.get("input_ids", args[0] if args else None)
        B, device = self._batch(ids, kwargs.get("inputs_embeds"))
        self.state.task_ids = self.task_index(tasks, B, device)
        try:
            return self.model.generate(*args, **kwargs)
        finally:
            self.state.task_ids = None

    # ------------------------------------------------------------------ folding and files
    def fold(self, deep: Optional[bool] = None) -> dict:
        """Fold every task (see :meth:`PromptAdapter.fold`); ``deep`` defaults to True for
        prompt methods (they run on causal decoders). Returns a report per task."""
        report = {}
        for name, adapter in self.tasks.items():
            d = adapter.method != "prefix_tuning" if deep is None else deep
            report[name] = adapter.fold(self.model, self._backbone, deep=d)
        self._invalidate()
        return report

    def save_pretrained(self, directory: str, tasks: Optional[Sequence[str]] = None) -> None:
        from ptune_fast import io

        for name in tasks or self.task_names:
            io.save_adapter(self.tasks[name], f"{directory}/{name}")

    def load_task(self, name: str, path: str) -> "TaskBank":
        """Load one task from a ptune_fast adapter directory or a PEFT adapter directory;
        on any error the bank is left as it was."""
        from ptune_fast import io

        return self.add_task(name, io.load_adapter(path, self.model))

    @classmethod
    def from_pretrained(cls, hf_model, paths: Dict[str, str]) -> "TaskBank":
        bank = cls(hf_model)
        for name, path in paths.items():
            bank.load_task(name, path)
        return bank


def _single(hf_model, adapter: PromptAdapter) -> TaskBank:
    return TaskBank(hf_model, {"default": adapter})


def prefix_tuning(hf_model, num_virtual_tokens: int, prefix_projection: bool = False,
                  encoder_hidden_size: Optional[int] = None, init: str = "normal") -> TaskBank:
    """Prefix tuning (``prefix_projection=True``) or P-Tuning v2 on a plain transformers model."""
    return _single(hf_model, PromptAdapter.prefix_tuning(hf_model, num_virtual_tokens, prefix_projection,
                                                         encoder_hidden_size, init))


def p_tuning(hf_model, num_virtual_tokens: int, encoder_type: str = "MLP",
             encoder_hidden_size: Optional[int] = None, encoder_num_layers: int = 2) -> TaskBank:
    """P-tuning (v1) with an MLP or biLSTM prompt encoder, on a causal decoder."""
    return _single(hf_model, PromptAdapter.p_tuning(hf_model, num_virtual_tokens, encoder_type,
                                                    encoder_hidden_size, encoder_num_layers))


def prompt_tuning(hf_model, num_virtual_tokens: int, init: str = "random", init_token_ids=None,
                  init_text=None, tokenizer=None) -> TaskBank:
    """Prompt tuning on a causal decoder (init: random, sample_vocab, or text via init_token_ids or
    init_text + tokenizer)."""
    return _single(hf_model, PromptAdapter.prompt_tuning(hf_model, num_virtual_tokens, init, init_token_ids,
                                                         init_text, tokenizer))
