"""The tested dependency ranges are declared once per place and agree: setup.py, ptune_fast.versions,
the constraints files CI installs; the installed set is inside them (CI runs what it declares)."""
import os
import re

import pytest

from ptune_fast import versions

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _setup_ranges():
    text = open(os.path.join(ROOT, "setup.py")).read()
    out = {}
    for dist in versions.TESTED:
        m = re.search(rf'"{dist}>=([\d.]+),<([\d.]+)"', text)
        assert m, f"setup.py declares no tested range for {dist}"
        out[dist] = (m.group(1), m.group(2))
    return out


def test_setup_py_declares_the_tested_ranges():
    assert _setup_ranges() == versions.TESTED


@pytest.mark.parametrize("name", ["ci.txt", "oldest.txt"])
def test_constraints_pin_versions_inside_the_ranges(name):
    pins = {}
    for line in open(os.path.join(ROOT, "constraints", name)):
        m = re.match(r"([A-Za-z0-9_.-]+)==([^\s;#]+)", line.strip())
        if m:
            pins[m.group(1).lower()] = m.group(2)
    for dist in ("torch", "transformers", "peft"):
        assert dist in pins, f"constraints/{name} pins no {dist}"
        assert versions.in_range(dist, pins[dist]), (name, dist, pins[dist])


def test_installed_versions_are_tested_ones():
    assert versions.check() == []


def test_out_of_range_is_reported(monkeypatch):
    import importlib.metadata

    real = importlib.metadata.version
    monkeypatch.setattr(importlib.metadata, "version",
                        lambda d: "5.99.0" if d == "transformers" else real(d))
    msgs = versions.check()
    assert len(msgs) == 1 and "transformers 5.99.0 is outside the tested range >=5.17,<5.25" in msgs[0]
    assert versions.in_range("torch", "2.13.0+cpu") and not versions.in_range("torch", "2.14.0")
