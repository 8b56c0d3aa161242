"""The benchmark runner (``python -m benchmarks.run``): a smoke run over every kind of case, the
results writer (JSON and Markdown first, plots optional), the README section, the CLI's errors."""
from __future__ import annotations

import importlib.util
import json
import os
import sys

import pytest
import torch

pytest.importorskip("peft")

from benchmarks import cases as C  # noqa: E402
from benchmarks import measure as M  # noqa: E402
from benchmarks import report as R  # noqa: E402
from benchmarks import run  # noqa: E402

HAVE_MPL = importlib.util.find_spec("matplotlib") is not None
#: every kind (train, prefill, generate, bank) and extra measurement of the smoke preset, ~8 s of CPU
SMOKE = ["all", "--preset", "smoke", "--methods", "prefix_proj", "prefix", "prompt", "--batches", "2", "3", "6",
         "--repeat", "2", "--warmup", "0", "--threads", "1"]


@pytest.fixture(scope="module")
def smoke(tmp_path_factory):
    out = tmp_path_factory.mktemp("bench")
    threads = torch.get_num_threads()
    try:
        report = run.main(SMOKE + ["--out-dir", str(out), "--name", "smoke"] + ([] if HAVE_MPL else ["--no-plots"]))
    finally:
        torch.set_num_threads(threads)  # the rest of the test session keeps its thread count
    return report, out


def test_smoke_run_measures_every_kind(smoke):
    report, out = smoke
    assert report["env"]["torch_threads"] == 1  # --threads 1, recorded
    rows = {r["id"]: r for r in report["rows"]}
    assert {r["kind"] for r in rows.values()} == {"train", "prefill", "generate", "bank"}
    measured = {m for r in rows.values() for m in r["measure"]}
    assert measured == set(run.MEASUREMENTS) - {"train", "prefill", "generate", "bank"}
    for r in rows.values():
        t = r["time"]
        assert t[C.PEFT]["n"] == 2 and t[C.FAST]["q1_ms"] <= t[C.FAST]["median_ms"] <= t[C.FAST]["q3_ms"]
        assert r["speedup"][C.FAST] == pytest.approx(t[C.PEFT]["median_ms"] / t[C.FAST]["median_ms"])
        assert r["verdict"][C.FAST] == M.verdict(t[C.PEFT], t[C.FAST])
        if r["kind"] != "generate":
            assert r["parity"]["max_abs_logit_diff"] <= 1e-4, (r["id"], r["parity"])
    tr = rows["train_step-train-prefix_proj-B2-S8-P3"]
    assert tr["encoder_calls_per_step"][C.FAST] == 1 and tr["state_bytes_measured"] == tr["prefix_bytes"][C.FAST]
    assert tr["prefix_bytes"][C.PEFT] == 2 * 2 * tr["prefix_bytes"][C.FAST]  # 2*B*X vs X
    assert tr["peak_bytes"][C.FAST] > 0 and tr["saved_bytes"][C.FAST] > 0 and "attention" in tr
    e2e = rows["e2e-train-prefix-B2-S12-P4"]
    assert set(e2e["time"]) == {C.PEFT, C.FAST, C.FAST_GC} and set(e2e["breakdown"][C.FAST]["ms"]) == set(M.BUCKETS)
    assert e2e["peft_gc"]["get_peft_model_on_checkpointing_base"].startswith("ValueError"), e2e["peft_gc"]
    assert e2e["max_batch"].startswith("Skipped on CPU")
    assert {C.DIAG, C.BASE} <= set(rows["fold_bank-prefill-prompt-B2-S16-n10"]["time"])
    assert C.ONE_BATCH in rows["fold_bank-bank-generate-3x2-S8-P5"]["time"]
    assert "fold_report" in rows["fold_bank-prefill-prompt-B2-S16-n10"]
    env = report["env"]
    for k in ("date", "device", "cpu", "torch", "transformers", "peft", "ptune_fast", "git_commit"):
        assert env[k], k
    assert report["command"].startswith("python -m benchmarks.run all --preset smoke")


def test_smoke_run_writes_json_markdown_and_plots(smoke):
    report, out = smoke
    saved = json.loads((out / "smoke.json").read_text())
    assert saved["rows"] == json.loads(json.dumps(report["rows"]))
    md = (out / "smoke.md").read_text()
    assert "speedup = PEFT median / ptune_fast median" in md and report["command"] in md
    for title in R.KIND_TITLE.values():
        assert title in md
    if HAVE_MPL:
        assert saved["plots"] == ["smoke-time.png", "smoke-speedup.png", "smoke-peak_memory.png", "smoke-breakdown.png"]
        assert all((out / p).stat().st_size > 0 for p in saved["plots"])
    (out / "smoke.md").unlink()
    run.main(["--render", str(out / "smoke.json"), "--no-plots"])  # Markdown again from the JSON alone
    assert (out / "smoke.md").read_text() == md


def test_readme_section_is_generated_from_the_report(smoke, capsys):
    report, out = smoke
    run.main(["--readme", str(out / "smoke.json")])
    text = capsys.readouterr().out
    assert "speedup = PEFT time / ptune_fast time" in text and report["command"] in text
    r = report["rows"][0]
    assert f"| {C.shape(r)} | {r['time'][C.PEFT]['median_ms']:.1f} | {r['time'][C.FAST]['median_ms']:.1f} | " \
           f"{r['speedup'][C.FAST]:.2f}x | {r['verdict'][C.FAST]} |" in text


def test_results_are_written_before_plots_and_without_matplotlib(smoke, tmp_path, monkeypatch, capsys):
    report = json.loads(json.dumps(smoke[0]))
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import matplotlib -> ImportError
    R.write(report, str(tmp_path), "nompl")
    assert json.loads((tmp_path / "nompl.json").read_text())["plots_skipped"].startswith("matplotlib is not importable")
    assert "Plots skipped: matplotlib is not importable" in (tmp_path / "nompl.md").read_text()
    assert "plots skipped" in capsys.readouterr().err
    monkeypatch.setattr(R, "make_plots", lambda *a: (_ for _ in ()).throw(RuntimeError("plot bug")))
    with pytest.raises(RuntimeError, match="plot bug"):
        R.write(report, str(tmp_path / "crash"), "r")
    assert os.path.getsize(tmp_path / "crash" / "r.json") > 0 and os.path.getsize(tmp_path / "crash" / "r.md") > 0


def test_verdict_only_when_the_iqrs_do_not_overlap():
    a = M.stats([0.010, 0.011, 0.012])
    assert M.verdict(a, M.stats([0.0105, 0.0115, 0.0125])) == "within noise"
    assert M.verdict(a, M.stats([0.005, 0.006, 0.007])) == "faster"
    assert M.verdict(a, M.stats([0.02, 0.021, 0.022])) == "slower"
    row = dict(kind="train", suite="e2e", method="prefix_proj", B=2, S=12, nv=4)
    rep = {"backend_calls": {"prefix_attention -> sdpa": 3}, "rows": [
        dict(row, speedup={C.FAST: 0.9}, verdict={C.FAST: "within noise"}),
        dict(row, speedup={C.FAST: 1.5}, verdict={C.FAST: "faster"})]}
    notes = R.notes(rep)
    assert "`sdpa` backend" in notes[0]
    assert notes[1:] == ["prefix+proj B=2 S=12 P=4: speedup 0.90x -- within noise (the IQRs overlap): no verdict",
                         "prefix+proj B=2 S=12 P=4: speedup 1.50x -- ptune_fast faster"]


def test_max_batch_search():
    """The GPU largest-batch search (doubling, then bisection to 1/16) on a known threshold."""
    for true_max in (0, 1, 2, 3, 17, 100, 1000, 4095, 4096, 5000):
        tried = []

        def fits(B):
            tried.append(B)
            return B <= true_max

        best, first_fail, at_limit = M.search_max_batch(fits, 4096)
        assert best <= true_max and (first_fail is None or first_fail > true_max)
        assert at_limit == (true_max >= 4096)
        assert first_fail is None or first_fail - best <= max(1, best // 16)
        assert len(tried) <= 2 * 13 + 1


@pytest.mark.parametrize("argv,message", [
    ([], "SUITE is required"),
    (["nope"], "SUITE must be one of"),
    (["e2e", "--repeat", "0"], "--repeat must be >= 1"),
    (["e2e", "--device", "tpu"], "--device"),
    (["--list", "--readme", "x.json"], "exclude each other"),
])
def test_cli_errors_name_the_argument(argv, message, capsys):
    with pytest.raises(SystemExit) as exc:
        run.parse(argv)
    assert exc.value.code == 2 and message in capsys.readouterr().err


def test_expand_names_bad_suite_and_preset():
    with pytest.raises(ValueError, match="suite must be one of"):
        C.expand("nope", "smoke")
    with pytest.raises(ValueError, match="preset must be one of"):
        C.expand("e2e", "huge")
    for suite in C.SUITES:
        for preset in C.PRESETS:
            ids = [c["id"] for c in C.expand(suite, preset)[3]]
            assert len(ids) == len(set(ids)) > 0, (suite, preset)


def test_render_and_readme_refuse_what_is_not_a_report(tmp_path):
    old = tmp_path / "old.json"
    old.write_text(json.dumps({"rows": [], "env": {}, "command": "python -m benchmarks.e2e"}))
    for flag in ("--render", "--readme"):
        with pytest.raises(SystemExit, match=f"{flag}: .*old.json: not a benchmarks.run report"):
            run.main([flag, str(old)])
