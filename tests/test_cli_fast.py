"""The CLI answers at once (no torch import for --help) and survives a closed pipe."""
import subprocess
import sys


def test_help_imports_neither_torch_nor_transformers():
    code = ("import sys, runpy; sys.argv = ['ptune_fast', '--help']\n"
            "try:\n    runpy.run_module('ptune_fast', run_name='__main__')\nexcept SystemExit:\n    pass\n"
            "print('HEAVY', [m for m in ('torch', 'transformers', 'peft') if m in sys.modules])")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert "usage: ptune_fast" in out.stdout, out.stderr
    assert "HEAVY []" in out.stdout, out.stdout


def test_info_json_into_a_closed_pipe_is_quiet():
    p = subprocess.Popen([sys.executable, "-m", "ptune_fast", "info", "--json"], stdout=subprocess.PIPE,
                         stderr=subprocess.PIPE)
    p.stdout.readline()
    p.stdout.close()  # like `| head -1`
    err = p.stderr.read().decode()
    assert p.wait(timeout=120) == 0 and "BrokenPipeError" not in err, err
