"""Issue 13 item 2: transformers serve's OpenAI-compatible server (its FastAPI app and continuous
batching) serving a tiny base model plus three adapter directories (two PEFT, one ptune_fast),
started as `python -m ptune_fast.serving` on loopback and driven by the openai client: parallel
completions for three tasks equal each task's PEFT semantics alone; an unknown task, malformed
and oversized requests get clear HTTP errors and the server keeps serving; SIGINT shuts it down."""
import concurrent.futures
import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request

import pytest
import torch

pytest.importorskip("peft")
from transformers.utils.import_utils import is_serve_available  # noqa: E402

if not is_serve_available():
    pytest.skip("transformers serve needs fastapi, uvicorn and openai (pip install fastapi uvicorn openai)",
                allow_module_level=True)

import openai  # noqa: E402

from ptune_fast import io  # noqa: E402
from tests.models import V, tiny_model  # noqa: E402
from tests.test_serving import Refs, _task_pm  # noqa: E402

METHODS = {"pre": "prefix_proj", "v2": "prefix", "prm": "prompt"}
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _tokenizer():
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {f"w{i}": i for i in range(V)}
    vocab["<unk>"] = V  # outside the model's vocabulary: never generated, never dropped by decode
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>")


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _post(port, body: bytes):
    req = urllib.request.Request(f"http://127.0.0.1:{port}/v1/completions", data=body,
                                 headers={"content-type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=60) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    d = tmp_path_factory.mktemp("serve")
    base = tiny_model("llama")
    base.generation_config.eos_token_id = None
    base.save_pretrained(d / "base")
    tok = _tokenizer()
    tok.save_pretrained(d / "base")
    pms = {name: _task_pm("llama", m, 100 + i) for i, (name, m) in enumerate(METHODS.items())}
    pms["pre"].save_pretrained(d / "pre")  # PEFT adapter directories
    pms["prm"].save_pretrained(d / "prm")
    io.save_adapter(io.adapter_from_peft(pms["v2"]), str(d / "v2"))  # a ptune_fast adapter directory
    port = _free_port()
    cmd = [sys.executable, "-m", "ptune_fast.serving", str(d / "base"), "--host", "127.0.0.1", "--port", str(port),
           "--device", "cpu", "--cb-num-blocks", "32", "--cb-max-batch-tokens", "64"]
    for name in METHODS:
        cmd += ["--task", f"{name}={d / name}"]
    log = open(d / "server.log", "w+")
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 240
        while True:
            if proc.poll() is not None:
                log.seek(0)
                pytest.fail(f"server exited with {proc.returncode}:\n{log.read()[-3000:]}")
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=5) as r:
                    if r.status == 200:
                        break
            except OSError:
                pass
            if time.monotonic() > deadline:
                pytest.fail("server did not answer /health within 240 s")
            time.sleep(0.5)
        yield dict(port=port, proc=proc, log=log, tok=tok, refs=Refs("llama", pms, METHODS))
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        log.close()


def test_serve_tasks_in_parallel_errors_and_shutdown(server):
    port, tok, refs = server["port"], server["tok"], server["refs"]
    client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="unused", max_retries=0, timeout=120)
    assert sorted(m.id for m in client.models.list().data) == sorted(METHODS)

    g = torch.Generator().manual_seed(11)
    jobs = [(task, torch.randint(2, V, (int(L),), generator=g).tolist(), n)
            for task in METHODS for L, n in ((4, 5), (9, 3))]

    def complete(job):
        task, ids, n = job
        return client.completions.create(model=task, prompt=" ".join(f"w{i}" for i in ids), max_tokens=n,
                                         temperature=0)

    with concurrent.futures.ThreadPoolExecutor(len(jobs)) as pool:
        results = list(pool.map(complete, jobs))
    for (task, ids, n), res in zip(jobs, results):
        assert res.model == task
        assert res.choices[0].text == tok.decode(refs(task, ids, n)), (task, ids)
        assert res.usage.completion_tokens == n
    # the tasks really differ on the same prompt
    assert refs("pre", jobs[0][1], 5) != refs("prm", jobs[0][1], 5)

    with pytest.raises(openai.NotFoundError) as err:
        client.completions.create(model="nope", prompt="w5 w6", max_tokens=2)
    assert "unknown task 'nope'" in err.value.response.json()["detail"]
    status, body = _post(port, b'{"model": "pre", "prompt": ')  # not JSON
    assert status == 422, body
    status, body = _post(port, json.dumps({"model": "pre", "prompt": 5, "max_tokens": 2}).encode())
    assert status == 400 and "prompt must be a string" in body["detail"], body
    status, body = _post(port, json.dumps({"prompt": "w5", "max_tokens": 2}).encode())
    assert status == 400 and "`model` must name a task" in body["detail"], body
    status, body = _post(port, json.dumps({"model": "pre", "prompt": " ".join(["w7"] * 130),
                                           "max_tokens": 4}).encode())
    assert status == 400 and "request too long" in body["detail"], body

    # still serving, and streaming works too
    task, ids, n = jobs[1]
    again = complete(jobs[1])
    assert again.choices[0].text == tok.decode(refs(task, ids, n))
    chunks = client.completions.create(model="prm", prompt="w5 w6 w7", max_tokens=4, stream=True)
    streamed = "".join(c.choices[0].text for c in chunks)
    assert streamed == tok.decode(refs("prm", [5, 6, 7], 4))

    proc = server["proc"]
    proc.send_signal(signal.SIGINT)
    assert proc.wait(timeout=60) == 0
    log = server["log"]
    log.seek(0)
    text = log.read()
    assert "Traceback" not in text, text[-3000:]
    assert "serving tasks ['pre', 'v2', 'prm']" in text and "CB: True" in text, text[-3000:]
