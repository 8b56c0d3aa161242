"""``python -m ptune_fast.serving BASE --task NAME=ADAPTER_DIR [--task ...]``: transformers serve's
OpenAI-compatible server (continuous batching) for a base model plus N prompt-learning adapters
(ptune_fast or PEFT adapter directories). The request's ``model`` field names the task."""
from __future__ import annotations

import argparse
import sys


def _task(value: str):
    name, sep, path = value.partition("=")
    if not sep or not name or not path:
        raise argparse.ArgumentTypeError(f"--task takes NAME=ADAPTER_DIR, got {value!r}")
    return name, path


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m ptune_fast.serving", description=__doc__)
    p.add_argument("base", help="base model: a local directory or a Hub id (with its tokenizer)")
    p.add_argument("--task", type=_task, action="append", required=True, metavar="NAME=ADAPTER_DIR",
                   help="a task and its adapter directory (ptune_fast or PEFT); repeat for more tasks")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--device", default=None, help="cpu, cuda, cuda:1 ... (default: cuda if available)")
    p.add_argument("--dtype", default="auto", help="auto, float32, bfloat16, float16")
    p.add_argument("--cb-num-blocks", type=int, default=None, help="paged KV cache blocks")
    p.add_argument("--cb-max-batch-tokens", type=int, default=None, help="tokens per continuous-batching step")
    p.add_argument("--cb-page-size", type=int, default=None, help="tokens per cache page")
    p.add_argument("--log-level", default="warning")
    return p


def main(argv=None) -> int:
    args = parser().parse_args(argv)
    tasks = dict(args.task)
    if len(tasks) != len(args.task):
        raise SystemExit("--task: task names must be unique")
    from transformers import ContinuousBatchingConfig

    from ptune_fast.serving.http import load, serve

    cb = {}
    if args.cb_num_blocks is not None:
        cb["num_blocks"] = args.cb_num_blocks
    if args.cb_max_batch_tokens is not None:
        cb["max_batch_tokens"] = args.cb_max_batch_tokens
    if args.cb_page_size is not None:
        cb["page_size" if hasattr(ContinuousBatchingConfig, "page_size") else "block_size"] = args.cb_page_size
    manager, tokenizer = load(args.base, tasks, device=args.device, dtype=args.dtype, **cb)

    def ready():
        print(f"ptune_fast: serving tasks {manager.bank.task_names} of {args.base} on "
              f"http://{args.host}:{args.port}/v1 (model field = task)", file=sys.stderr, flush=True)

    serve(manager, tokenizer, host=args.host, port=args.port, log_level=args.log_level, on_ready=ready)
    return 0


if __name__ == "__main__":
    sys.exit(main())
