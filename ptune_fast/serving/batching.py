"""``TaskBatchingManager``: a :class:`~ptune_fast.TaskBank` served through transformers' own
continuous batching (``model.init_continuous_batching`` -> ``ContinuousBatchingManager``).

Each request names a task. transformers' scheduler packs requests of any task and length into
each step and keeps their new tokens in its paged KV cache; the prefixes stay in the bank and
are attended by :func:`ptune_fast.serving.paged.paged_prefix_attention`. Hooks, all on the one
manager instance (nothing in transformers is patched globally):

* the model runs under our registered attention implementation while the manager serves
  (see :mod:`ptune_fast.serving.paged` for the two transformers behaviours);
* ``batch_processor.model_runner.compute_batch`` is wrapped: under the bank's lock it reads the
  packed requests (``inputs_and_outputs.requests_in_batch``), maps each request id to its task's
  bank index, gives the real tokens PEFT's positions (continuous batching's per-request positions
  ``past + i``, shifted by the P virtual tokens, for every method), and runs the step;
* ``output_router.deliver`` / ``deliver_batch`` are wrapped to forget finished requests.

Forced continuous-batching settings: no prefix-block sharing (a request's K/V depends on its
task's prefix, so two tasks' identical prompts must not share cache blocks), no CUDA graphs, no
async double-buffering, no block-table decode path (the per-batch task index is host data read
at each step), one sequence per request.

Served: prefix tuning, P-Tuning v2 and deep-folded prompt tuning / P-tuning tasks (``TaskBank.fold``;
:meth:`from_bank` folds for you). Models: causal LMs whose positions follow the cache length
(RoPE / absolute tables: Llama, Mistral, Qwen, GPT-2, ...), full attention only.
"""
from __future__ import annotations

import threading
import time
import uuid
from typing import Dict, Iterable, List, Optional, Sequence

import torch

from ptune_fast.serving import paged

_FORCED = {"allow_block_sharing": False, "use_cuda_graph": False, "use_async_batching": False,
           "max_blocks_per_request": 0}


def _cb_config(config=None, **overrides):
    """A ``ContinuousBatchingConfig`` with our forced settings; refuses a config that asks otherwise."""
    import copy

    from transformers import ContinuousBatchingConfig

    cfg = ContinuousBatchingConfig(**overrides) if config is None else copy.deepcopy(config)
    for k, v in overrides.items():
        setattr(cfg, k, v)
    default = ContinuousBatchingConfig()
    for name, value in _FORCED.items():
        got = getattr(cfg, name, None)
        if got != getattr(default, name, None) and got not in (value, (False, False)):
            raise ValueError(f"continuous_batching_config.{name}={got!r}: ptune_fast serves task banks with "
                             f"{name}={value!r} (see ptune_fast.serving.batching)")
        setattr(cfg, name, value)
    if hasattr(cfg, "auto_switch_to_flash"):
        cfg.auto_switch_to_flash = False  # flash attention would bypass the bank's prefixes
    for name in ("varlen_compile_config", "decode_compile_config"):
        if getattr(cfg, name, None) is not None:
            raise ValueError(f"continuous_batching_config.{name}: torch.compile is not supported by ptune_fast's "
                             "continuous batching (the per-step task index is host data)")
    if getattr(cfg, "default_compile_level", 0):
        raise ValueError("continuous_batching_config.default_compile_level must be 0 for ptune_fast")
    return cfg


def check_servable(bank) -> None:
    """Raise a clear error if ``bank`` cannot be served through continuous batching."""
    from ptune_fast.integrations.core import describe

    if not len(bank.tasks):
        raise ValueError("the bank holds no task")
    bank._check_attached()
    model = bank.model
    if not hasattr(model, "init_continuous_batching"):
        raise ValueError(f"{type(model).__name__} has no init_continuous_batching (transformers' continuous "
                         "batching serves generative models)")
    caps = describe(model)
    if caps.positions != "cache":
        raise ValueError(f"ptune_fast's continuous batching cannot serve model type {caps.model_type!r}: it derives "
                         f"positions by the {caps.positions!r} rule, continuous batching passes per-request positions")
    if not caps.causal:
        raise ValueError(f"model type {caps.model_type!r} is not a causal decoder")
    types = set(getattr(model.config.get_text_config(), "layer_types", None) or ["full_attention"])
    if types != {"full_attention"}:
        raise ValueError(f"model type {caps.model_type!r} has layer types {sorted(types)}: ptune_fast's continuous "
                         "batching serves full-attention layers only")
    for name, adapter in bank.tasks.items():
        check_adapter(name, adapter)
    paged.cache_style()  # raises on a transformers release with an unknown paged-cache interface


def check_adapter(name, adapter) -> None:
    if adapter.method != "prefix_tuning" and adapter.folded != "deep":
        raise ValueError(f"task {name!r} ({adapter.method}) must be deep-folded to be served by continuous batching "
                         "(bank.fold(deep=True): its virtual tokens become static per-layer K/V, exactly)")


class TaskBatchingManager:
    """Serve ``bank`` through transformers' continuous batching; see the module docstring.

    ``generation_config``: shared by every request (transformers' CB has one per manager);
    greedy by default. ``max_new_tokens`` and ``eos_token_id`` may differ per request.
    ``continuous_batching_config`` (or keyword overrides such as ``num_blocks=64``,
    ``max_batch_tokens=256``) sizes the paged cache.
    """

    def __init__(self, bank, generation_config=None, continuous_batching_config=None, **cb_overrides):
        from transformers import GenerationConfig

        check_servable(bank)
        self.bank = bank
        gc = generation_config if generation_config is not None else GenerationConfig(do_sample=False, max_new_tokens=32)
        if (getattr(gc, "num_return_sequences", None) or 1) > 1 or (getattr(gc, "num_beams", None) or 1) > 1:
            raise ValueError("ptune_fast's continuous batching serves one sequence per request (no beams, no "
                             "num_return_sequences)")
        self.generation_config = gc
        self.cb_config = _cb_config(continuous_batching_config, **cb_overrides)
        self.manager = None
        self._tasks: Dict[str, str] = {}  # request id -> task name, until its final output is delivered
        self._reg_lock = threading.Lock()
        self._previous_impl = None
        #: steps run, and how many of them mixed tasks / prefill and decode rows
        self.stats = {"steps": 0, "max_requests": 0, "mixed_task_steps": 0, "mixed_length_steps": 0}
        #: set to a list to record ``(request ids, query lengths)`` of every step (tests)
        self.trace: Optional[list] = None
        P = bank.state.num_virtual_tokens
        limit = getattr(bank.model.config.get_text_config(), "max_position_embeddings", None)
        #: longest prompt + new tokens a request may have (positions P .. P + length - 1 must exist)
        self.max_length = None if limit is None else int(limit) - P

    # ------------------------------------------------------------------ life cycle
    @classmethod
    def from_bank(cls, bank, fold: bool = True, **kwargs) -> "TaskBatchingManager":
        """Like the constructor; ``fold=True`` first deep-folds every task that needs it."""
        if fold and any(a.method != "prefix_tuning" and a.folded != "deep" for a in bank.tasks.values()):
            bank.fold(deep=True)
        return cls(bank, **kwargs)

    def start(self) -> "TaskBatchingManager":
        if self.manager is not None and self.manager.is_running():
            return self
        paged.register()
        bank, model = self.bank, self.bank.model
        with bank._lock:
            check_servable(bank)
            self._previous_impl = model.config._attn_implementation
            target = paged.implementation_name()
            # what continuous batching accepts at creation and does not switch away from
            model.set_attn_implementation("sdpa" if paged.cache_style() == "layer" else target)
            try:
                manager = model.init_continuous_batching(generation_config=self.generation_config,
                                                         continuous_batching_config=self.cb_config)
                model.set_attn_implementation(target)
                if model.config._attn_implementation != target:
                    raise RuntimeError(f"continuous batching switched the model to {model.config._attn_implementation!r}")
            except BaseException:
                model.set_attn_implementation(self._previous_impl)
                raise
            manager._original_attn_impl = None  # we restore the bank's implementation ourselves (stop)
            self._install(manager)
            self.manager = manager
        manager.start()
        return self

    def stop(self, timeout: Optional[float] = 30.0) -> None:
        manager, self.manager = self.manager, None
        if manager is None:
            return
        try:
            if manager.is_running():
                manager.stop(block=True, timeout=timeout)
        finally:
            with self.bank._lock:
                if self._previous_impl is not None:
                    self.bank.model.set_attn_implementation(self._previous_impl)
                    self._previous_impl = None
            with self._reg_lock:
                self._tasks.clear()

    def is_running(self) -> bool:
        return self.manager is not None and self.manager.is_running()

    def __enter__(self):
        return self.start()

    def __exit__(self, *exc):
        self.stop()

    # ------------------------------------------------------------------ hooks
    def _install(self, manager) -> None:
        create = manager._create_batch_processor

        def create_batch_processor():
            bp = create()
            runner = bp.model_runner
            if not getattr(runner, "_ptune_fast_wrapped", False):
                runner.compute_batch = self._wrap_compute(bp, runner.compute_batch)
                runner._ptune_fast_wrapped = True
            return bp

        manager._create_batch_processor = create_batch_processor
        router = manager.output_router
        deliver, deliver_batch = router.deliver, router.deliver_batch

        def forget(outputs):
            with self._reg_lock:
                for out in outputs:
                    if out.is_finished():
                        self._tasks.pop(out.request_id, None)

        def deliver_(output):
            forget([output])
            deliver(output)

        def deliver_batch_(outputs):
            forget(outputs)
            deliver_batch(outputs)

        router.deliver, router.deliver_batch = deliver_, deliver_batch_

    def _wrap_compute(self, bp, compute):
        from transformers.generation.continuous_batching.input_outputs import ContinuousBatchingIOs

        bank = self.bank

        def compute_batch(model, batch_data):
            io = bp.inputs_and_outputs
            if type(io) is not ContinuousBatchingIOs:
                raise RuntimeError(f"ptune_fast's continuous batching needs synchronous IOs, got {type(io).__name__}")
            ids = [fs.state.request_id for fs in io.requests_in_batch]
            with bank._lock:
                with self._reg_lock:
                    tasks = [self._tasks.get(i) for i in ids]
                missing = [i for i, t in zip(ids, tasks) if t is None or t not in bank.tasks]
                if missing:
                    raise RuntimeError(f"requests {missing} have no task of this bank (add requests through "
                                       "TaskBatchingManager.add_request)")
                # row -> bank index (None for a single-task bank), as for the bank's own calls
                tids = bank.task_index(tasks, len(ids), batch_data["input_ids"].device)
                attachment = bank._attachment
                saved = attachment.ignore_position_ids
                attachment.ignore_position_ids = False  # given positions + P: PEFT's, for every method here
                bank.state.task_ids = None
                self._count(io, ids, tasks)
                paged.set_batch(paged.BatchTasks(tids, len(ids)))
                try:
                    return compute(model, batch_data)
                finally:
                    paged.set_batch(None)
                    attachment.ignore_position_ids = saved

        return compute_batch

    def _count(self, io, ids, tasks) -> None:
        lens = tuple(fs.query_length for fs in io.requests_in_batch)
        st = self.stats
        st["steps"] += 1
        st["max_requests"] = max(st["max_requests"], len(ids))
        st["mixed_task_steps"] += len(set(tasks)) > 1
        st["mixed_length_steps"] += len(set(lens)) > 1
        if self.trace is not None:
            self.trace.append((tuple(ids), lens))

    # ------------------------------------------------------------------ requests
    def check_request(self, task: str, num_tokens: int, max_new_tokens: Optional[int]) -> int:
        """Validate one request; returns its max_new_tokens. Raises KeyError (unknown task) or ValueError."""
        if not isinstance(task, str) or task not in self.bank.tasks:
            raise KeyError(f"unknown task {task!r}; this manager serves tasks {self.bank.task_names}")
        n = self.generation_config.max_new_tokens if max_new_tokens is None else max_new_tokens
        if not isinstance(n, int) or isinstance(n, bool) or n < 1:
            raise ValueError(f"max_new_tokens must be a positive int, got {n!r}")
        if num_tokens < 1:
            raise ValueError("a request needs at least one prompt token")
        if self.max_length is not None and num_tokens + n > self.max_length:
            raise ValueError(f"request too long: {num_tokens} prompt tokens + {n} new tokens > {self.max_length} "
                             f"(the model's {self.max_length + self.bank.state.num_virtual_tokens} positions minus "
                             f"{self.bank.state.num_virtual_tokens} virtual tokens)")
        return n

    def register(self, request_id: str, task: str) -> None:
        """Bind ``request_id`` to ``task`` before the request is handed to the transformers manager
        (used by the HTTP layer, which calls the manager's ``add_request`` itself)."""
        with self.bank._lock:
            if task not in self.bank.tasks:
                raise KeyError(f"unknown task {task!r}; this manager serves tasks {self.bank.task_names}")
            with self._reg_lock:
                if request_id in self._tasks:
                    raise ValueError(f"request id {request_id!r} is already in flight")
                self._tasks[request_id] = task

    def unregister(self, request_id: str) -> None:
        with self._reg_lock:
            self._tasks.pop(request_id, None)

    def in_flight(self) -> Dict[str, str]:
        with self._reg_lock:
            return dict(self._tasks)

    def add_request(self, input_ids: Sequence[int], task: str, request_id: Optional[str] = None,
                    max_new_tokens: Optional[int] = None, streaming: bool = False, **kwargs) -> str:
        if self.manager is None:
            raise RuntimeError("the manager is not started (start() or use it as a context manager)")
        input_ids = [int(t) for t in (input_ids.tolist() if isinstance(input_ids, torch.Tensor) else input_ids)]
        n = self.check_request(task, len(input_ids), max_new_tokens)
        request_id = request_id if request_id is not None else f"{task}-{uuid.uuid4().hex[:12]}"
        self.register(request_id, task)
        try:
            got = self.manager.add_request(input_ids, request_id=request_id, max_new_tokens=n, streaming=streaming,
                                           **kwargs)
        except BaseException:
            self.unregister(request_id)
            raise
        if got is None:
            self.unregister(request_id)
            raise RuntimeError("the continuous batching manager refused the request (stopping or not a TP driver)")
        return got

    def get_result(self, request_id: Optional[str] = None, timeout: Optional[float] = None):
        return self.manager.get_result(request_id=request_id, timeout=timeout)

    def generate(self, inputs: Iterable[Sequence[int]], tasks: Sequence[str], max_new_tokens=None,
                 timeout: float = 600.0) -> List[List[int]]:
        """Submit every request, wait for all; returns the generated tokens per request, in order."""
        inputs = list(inputs)
        if isinstance(tasks, str):
            tasks = [tasks] * len(inputs)
        if len(tasks) != len(inputs):
            raise ValueError(f"tasks must name one task per request ({len(inputs)}), got {len(tasks)}")
        per = max_new_tokens if isinstance(max_new_tokens, (list, tuple)) else [max_new_tokens] * len(inputs)
        ids = [self.add_request(x, t, max_new_tokens=m) for x, t, m in zip(inputs, tasks, per)]
        return [r.generated_tokens for r in self.wait(ids, timeout)]

    def wait(self, request_ids: Sequence[str], timeout: float = 600.0) -> list:
        """The final outputs of ``request_ids`` (transformers' ``GenerationOutput``), in order."""
        pending, done = set(request_ids), {}
        deadline = time.monotonic() + timeout
        while pending:
            left = deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError(f"requests {sorted(pending)} did not finish in {timeout} s")
            out = self.manager.get_result(timeout=min(left, 1.0))
            if out is None:
                err = self.manager.background_thread_status.fatal_error
                if err is not None or not self.manager.is_running():
                    raise RuntimeError(f"the continuous batching loop stopped: {err!r}")
                continue
            if out.request_id in pending and out.is_finished():
                if getattr(out, "error", None):
                    raise RuntimeError(f"request {out.request_id} failed: {out.error}")
                pending.discard(out.request_id)
                done[out.request_id] = out
        return [done[i] for i in request_ids]

    # ------------------------------------------------------------------ tasks while serving
    def add_task(self, name: str, adapter) -> None:
        """Add a task while serving (running requests are untouched: the bank's lock orders this
        between two steps, and every step reads the task index afresh)."""
        check_adapter(name, adapter)
        self.bank.add_task(name, adapter)

    def remove_task(self, name: str):
        with self.bank._lock:
            busy = sorted(r for r, t in self.in_flight().items() if t == name)
            if busy:
                raise ValueError(f"task {name!r} has requests in flight ({busy[:5]}); wait for them first")
            if name in self.bank.tasks and len(self.bank.tasks) == 1 and self.is_running():
                raise ValueError(f"cannot remove {name!r}, the last task, while serving (stop() first)")
            return self.bank.remove_task(name)
