"""``transformers serve`` with prompt-learning tasks: its FastAPI app, with a task bank as the model.

Everything HTTP is transformers' own (``transformers.cli.serving``: ``build_server``, the
OpenAI-compatible handlers for ``/v1/completions``, ``/v1/chat/completions``, ``/v1/responses``,
request validation, SSE streaming, ``CBGenerateManager`` driving the continuous-batching
manager). We provide the two objects the handlers ask for a model and a generation manager:

* :class:`BankModelManager` (a ``ModelManager``): the OpenAI ``model`` field names a **task**;
  every task resolves to the one base model and tokenizer; ``/v1/models`` lists the tasks; an
  unknown task is a 404, a missing or non-string ``model`` a 400;
* :class:`BankGenerationState` (a ``GenerationState``): one shared
  :class:`~ptune_fast.serving.TaskBatchingManager` for all tasks (transformers' own state would
  restart its CB manager whenever the model id changes); before a request is handed to
  transformers' ``CBGenerateManager`` it is bound to its task and checked (length: 400).

Run it with ``python -m ptune_fast.serving BASE_MODEL --task NAME=ADAPTER_DIR ...`` (see
``__main__``) or build the app with :func:`build_app` and serve it with uvicorn.
"""
from __future__ import annotations

import inspect
from typing import Optional


def _filtered(fn, **kwargs):
    params = inspect.signature(fn).parameters
    return {k: v for k, v in kwargs.items() if k in params}


def _http_error(status: int, detail: str):
    from fastapi import HTTPException

    return HTTPException(status_code=status, detail=detail)


def _classes():
    from transformers.cli.serving.model_manager import ModelManager
    from transformers.cli.serving.utils import CBGenerateManager, GenerationState

    return ModelManager, CBGenerateManager, GenerationState


def _make_model_manager(base):
    class BankModelManager(base):
        """Task names as model ids; every task is the bank's model and tokenizer."""

        def __init__(self, manager, tokenizer):
            model = manager.bank.model
            super().__init__(**_filtered(base.__init__, device=str(model.device), dtype="auto",
                                         continuous_batching=True, model_timeout=-1))
            self.serving = manager
            self.tokenizer = tokenizer

        def process_model_name(self, model_id):
            return model_id  # a task name, not a Hub id

        def load_model_and_processor(self, model_id, progress_callback=None, tqdm_class=None, gguf_file=None):
            if model_id not in self.serving.bank.tasks:
                raise _http_error(404, f"unknown task {model_id!r}: this server serves the tasks "
                                       f"{self.serving.bank.task_names} (name one in the `model` field)")
            return self.serving.bank.model, self.tokenizer

        def list_models(self, cache_dir=None):
            return [{"id": t, "object": "model", "created": 0, "owned_by": "ptune_fast",
                     "status": {"value": "loaded"}} for t in self.serving.bank.task_names]

        get_gen_models = list_models  # the name transformers 5.17's /v1/models calls

        def shutdown(self):
            self.serving.stop()

    return BankModelManager


def _make_generation_state(base, cb_base):
    class TaskView:
        """transformers' ``CBGenerateManager`` on the shared manager, for one task."""

        def __init__(self, manager, task):
            self.serving, self.task = manager, task
            self.cb = cb_base()
            self.cb._cb = manager.manager

        def init_cb(self, model, gen_config):  # the shared manager runs already
            if not self.serving.is_running():
                raise RuntimeError("the continuous batching manager is not running")

        def _bind(self, inputs, gen_config, request_id):
            shared = self.serving.generation_config
            if bool(getattr(gen_config, "do_sample", False)) != bool(getattr(shared, "do_sample", False)):
                raise _http_error(400, f"this server decodes with do_sample={bool(shared.do_sample)} for every "
                                       "request (transformers' continuous batching shares one generation config)")
            ids = inputs["input_ids"]
            try:
                self.serving.check_request(self.task, len(ids), gen_config.max_new_tokens)
                self.serving.register(request_id, self.task)
            except KeyError as exc:
                raise _http_error(404, str(exc.args[0])) from None
            except ValueError as exc:
                raise _http_error(400, str(exc)) from None

        def generate_streaming(self, model, processor, inputs, gen_config, request_id, **kwargs):
            self._bind(inputs, gen_config, request_id)
            try:
                return self.cb.generate_streaming(model, processor, inputs, gen_config, request_id=request_id,
                                                  **kwargs)
            except BaseException:
                self.serving.unregister(request_id)
                raise

        async def generate_non_streaming(self, model, processor, inputs, gen_config, request_id, **kwargs):
            self._bind(inputs, gen_config, request_id)
            try:
                return await self.cb.generate_non_streaming(model, processor, inputs, gen_config,
                                                            request_id=request_id, **kwargs)
            finally:
                self.serving.unregister(request_id)

        def stop(self):
            pass

    class BankGenerationState(base):
        """One continuous-batching manager for every task."""

        def __init__(self, manager):
            super().__init__(**_filtered(base.__init__, continuous_batching=True, compile=False, cb_config=None))
            self.serving = manager

        def use_continuous_batching(self, model, modality):
            return True

        def get_manager(self, model_id, use_cb=False):
            return TaskView(self.serving, model_id)

        def shutdown(self):
            self.serving.stop()

        def is_cb_alive(self):
            m = self.serving.manager
            return m is not None and m.is_running() and m.background_thread_status.fatal_error is None

    return BankGenerationState


class _TaskField:
    """Handler mixin: the ``model`` field must name a task (a clear 400, not a 500)."""

    def _resolve_model(self, body):
        model = body.get("model")
        if not isinstance(model, str) or not model:
            raise _http_error(400, "`model` must name a task (a string); tasks: "
                                   f"{self.model_manager.serving.bank.task_names}")
        return super()._resolve_model(body)


def build_app(manager, tokenizer, enable_cors: bool = False):
    """transformers serve's FastAPI app serving ``manager``'s tasks (the manager is started here
    if it is not running; the app's shutdown stops it)."""
    from transformers.cli.serving import server
    from transformers.cli.serving.chat_completion import ChatCompletionHandler
    from transformers.cli.serving.completion import CompletionHandler
    from transformers.cli.serving.response import ResponseHandler
    from transformers.cli.serving.transcription import TranscriptionHandler
    from transformers.utils.import_utils import is_serve_available

    if not is_serve_available():
        raise ImportError("transformers serve needs fastapi, uvicorn, pydantic and openai: "
                          "pip install 'fastapi>=0.115' 'uvicorn>=0.30' 'openai>=1.98'")
    ModelManager, CBGenerateManager, GenerationState = _classes()
    if not manager.is_running():
        manager.start()
    model_manager = _make_model_manager(ModelManager)(manager, tokenizer)
    state = _make_generation_state(GenerationState, CBGenerateManager)(manager)

    def handler(cls, **extra):
        sub = type(cls.__name__, (_TaskField, cls), {})
        return sub(**_filtered(cls.__init__, model_manager=model_manager, generation_state=state, **extra))

    handlers = dict(chat_handler=handler(ChatCompletionHandler, chat_template_kwargs={}),
                    completion_handler=handler(CompletionHandler),
                    response_handler=handler(ResponseHandler, chat_template_kwargs={}),
                    transcription_handler=TranscriptionHandler(model_manager, state))
    try:
        from transformers.cli.serving.systemone import SystemOneHandler

        handlers["systemone_handler"] = handler(SystemOneHandler, chat_template_kwargs={})
    except ImportError:  # transformers 5.17 has no /v1/systemone
        pass
    return server.build_server(model_manager, **_filtered(server.build_server, generation_state=state,
                                                          enable_cors=enable_cors, **handlers))


def serve(manager, tokenizer, host: str = "127.0.0.1", port: int = 8000, log_level: str = "warning",
          enable_cors: bool = False, on_ready=None) -> None:
    """Serve until interrupted (SIGINT / SIGTERM), then stop the manager."""
    import uvicorn

    app = build_app(manager, tokenizer, enable_cors=enable_cors)
    config = uvicorn.Config(app, host=host, port=port, log_level=log_level)
    server = uvicorn.Server(config)
    try:
        if on_ready is not None:
            on_ready()
        server.run()
    except KeyboardInterrupt:  # uvicorn re-raises the SIGINT it handled, after its graceful shutdown
        pass
    finally:
        manager.stop()


def load(base: str, tasks: dict, device: Optional[str] = None, dtype: str = "auto", **manager_kwargs):
    """Base model + tokenizer from ``base`` (a local directory or Hub id), a bank of the adapter
    directories ``tasks`` (name -> ptune_fast or PEFT adapter directory), deep-folded, and its
    :class:`~ptune_fast.serving.TaskBatchingManager` (not started). Returns ``(manager, tokenizer)``."""
    import copy

    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from ptune_fast import TaskBank
    from ptune_fast.serving.batching import TaskBatchingManager

    tokenizer = AutoTokenizer.from_pretrained(base)
    kw = {} if dtype == "auto" else {"dtype": getattr(torch, dtype)}
    model = AutoModelForCausalLM.from_pretrained(base, **kw)
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    model = model.to(device).eval()
    bank = TaskBank.from_pretrained(model, dict(tasks))
    gc = copy.deepcopy(model.generation_config)
    return TaskBatchingManager.from_bank(bank, fold=True, generation_config=gc, **manager_kwargs), tokenizer
