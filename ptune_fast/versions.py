"""The dependency ranges ptune_fast is tested on (setup.py declares the same ranges; a test
checks that they agree). ``python -m ptune_fast info`` warns outside them.

Lower bound: the oldest release CI runs; upper bound: below the first untested minor release.
The exact versions CI installs are pinned in ``constraints/ci.txt`` (newest tested set) and
``constraints/oldest.txt`` (oldest supported transformers).
"""
from __future__ import annotations

import importlib.metadata
import re
import warnings

#: distribution -> (lowest tested, first untested) as "major.minor[.patch]" strings
TESTED = {
    "torch": ("2.11", "2.14"),
    "transformers": ("5.17", "5.25"),
    "peft": ("0.21", "0.22"),
    "triton": ("3.6", "3.10"),
}


def _key(version: str) -> tuple:
    parts = []
    for piece in re.split(r"[.+]", version)[:3]:
        m = re.match(r"\d+", piece)
        if m is None:
            break
        parts.append(int(m.group()))
    return tuple(parts)


def in_range(dist: str, version: str) -> bool:
    low, high = TESTED[dist]
    v = _key(version)
    return _key(low) <= v < _key(high)


def check() -> list:
    """``[message]`` for every installed dependency outside its tested range."""
    out = []
    for dist, (low, high) in TESTED.items():
        try:
            version = importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:
            continue
        if not in_range(dist, version):
            out.append(f"{dist} {version} is outside the tested range >={low},<{high}; "
                       "ptune_fast may misbehave (please report it)")
    return out


def warn_untested() -> None:
    for msg in check():
        warnings.warn(msg, RuntimeWarning, stacklevel=2)
