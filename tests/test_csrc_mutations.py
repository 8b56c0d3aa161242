"""Proof that tests/test_csrc_on_cpu.py can fail: seeded bugs in copies of csrc/, each of which the
suite must catch, in the way named (a numerical mismatch, or the race / warp-mask checker).

Each mutant is one text substitution (it must apply exactly once: when the kernel changes, update
the mutant). The mutants are built in parallel (only the mutated file recompiles) and loaded into
this process next to each other; the test chosen for each runs on it, every parametrization in
order, until the first failure, which must match the expected report.
"""
import os
import re
from concurrent.futures import ThreadPoolExecutor

import pytest

from tests import test_csrc_on_cpu as on_cpu
from tests.cuda_host import harness

WHY = harness.why_unavailable()
pytestmark = pytest.mark.skipif(bool(WHY), reason=WHY or "")

# id: (file, original, mutant, the test of test_csrc_on_cpu.py to run, what its failure must contain)
MUTANTS = {
    "tile-count-off-by-one": (  # floor instead of ceil: the partial last tile of keys is never read
        "decode_attention.cu",
        "const int n_tiles = n_keys > 0 ? (n_keys + kTileKeys - 1) / kTileKeys : 1;",
        "const int n_tiles = n_keys > 0 ? n_keys / kTileKeys : 1;",
        "test_decode_matches_reference", r"AssertionError: max err"),
    "gqa-head-mapping": (  # query rows of kv head kvh taken interleaved (h % Hkv) instead of grouped
        "decode_attention.cu",
        "      const int hq = kvh * rep + gg / p.S;\n      const int s = gg % p.S;\n      val =",
        "      const int hq = kvh + (gg / p.S) * p.Hkv;\n      const int s = gg % p.S;\n      val =",
        "test_decode_matches_reference", r"AssertionError: max err"),
    "removed-syncthreads-after-kv-tile": (  # scores read K rows other threads are still writing
        "decode_attention.cu",
        "= vv;  // 16-byte aligned (D % 8 == 0)\n    }\n    __syncthreads();\n",
        "= vv;  // 16-byte aligned (D % 8 == 0)\n    }\n",
        "test_decode_matches_reference", r"racecheck: kernel decode_split_kernel.*hazard.*::k_s"),
    "too-few-score-rows": (  # a warp skips the scores of its last row when Gb is not a multiple of 4
        "decode_attention.cu",
        "warp_scores<T, D, RPT, RPT>((Gb - warp + kWarps - 1) / kWarps,",
        "warp_scores<T, D, RPT, RPT>((Gb - warp) / kWarps,",
        "test_decode_matches_reference", r"AssertionError: max err"),
    "split-merge-in-wrong-log-base": (  # combine weights exp(lse) although lse is log2-domain
        "decode_attention.cu",
        "const float w = exp2f(lse[s] - m);",
        "const float w = expf(lse[s] - m);",
        "test_decode_matches_reference", r"AssertionError: max err"),
    "dropped-padding-mask": (
        "decode_attention.cu",
        "} else if (p.mask == nullptr) {",
        "} else if (true) {",
        "test_decode_matches_reference", r"AssertionError: max err"),
    "dropped-causal-mask": (  # every query row sees the whole cache
        "decode_attention.cu",
        "jc <= p.T - p.S + (g0 + g) % p.S",
        "jc <= p.T - 1",
        "test_decode_matches_reference", r"AssertionError: max err"),
    "half-warp-shuffle-mask": (  # warp_max's shuffles name lanes 0..15 only
        "common.cuh",
        "x = fmaxf(x, __shfl_xor_sync(0xffffffffu, x, off));",
        "x = fmaxf(x, __shfl_xor_sync(0x0000ffffu, x, off));",
        "test_decode_matches_reference", r"synccheck: kernel decode_split_kernel.*__shfl_xor_sync\(mask 0x0000ffff\)"),
    "removed-syncthreads-before-encoder-chunk": (  # the next chunk overwrites h_s while it is read
        "prompt_encoder.cu",
        "__syncthreads();  // everyone is done reading the previous chunk of h_s",
        "// (barrier removed)",
        "test_encoder_matches_reference", r"racecheck: kernel encoder_mlp_kernel.*hazard.*::h_s"),
    "encoder-reduction-step-dropped": (  # lanes 2k and 2k+1 are never summed
        "prompt_encoder.cu",
        "  reduce_step<1>(acc, lane);\n",
        "",
        "test_encoder_matches_reference", r"AssertionError"),
}


def _mutated(name):
    file, old, new = MUTANTS[name][:3]
    text = open(os.path.join(harness.CSRC, file)).read()
    assert text.count(old) == 1, f"mutant {name}: the original text is not (once) in csrc/{file}; update it"
    return {file: text.replace(old, new)}


def _parametrizations(fn):
    """Every keyword set pytest would call ``fn`` with (its parametrize marks, crossed)."""
    combos = [{}]
    for mark in reversed([m for m in getattr(fn, "pytestmark", []) if m.name == "parametrize"]):
        names = [n.strip() for n in mark.args[0].split(",")]
        values = [v if len(names) > 1 else (v,) for v in mark.args[1]]
        combos = [dict(c, **dict(zip(names, v))) for c in combos for v in values]
    return combos


def _first_failure(name, kern):
    """Runs the test chosen for the mutant, every parametrization in order, on the mutant's
    library; returns the first failure as text ('' if none)."""
    test = getattr(on_cpu, MUTANTS[name][3])
    for kwargs in _parametrizations(test):
        kern.configure()
        kern.launch_log()
        try:
            test(kern=kern, **kwargs)
        except Exception as e:  # noqa: BLE001 - an assertion or the checker's KernelError
            return f"{type(e).__name__}: {e}"
    return ""


@pytest.fixture(scope="module")
def mutant_libs():
    harness.build()  # the shared objects first, so that each mutant compiles only its own file
    with ThreadPoolExecutor(max_workers=os.cpu_count() or 2) as ex:
        return dict(zip(MUTANTS, ex.map(lambda n: harness.build(_mutated(n)), MUTANTS)))


@pytest.mark.parametrize("name", list(MUTANTS))
def test_mutant_is_caught(mutant_libs, name):
    failure = _first_failure(name, harness.Kernels(*mutant_libs[name]))
    assert failure, f"mutant {name} passed {MUTANTS[name][3]}"
    expected = MUTANTS[name][4]
    assert re.search(expected, failure, re.S), f"mutant {name} caught, but not by /{expected}/: {failure[:3000]}"
