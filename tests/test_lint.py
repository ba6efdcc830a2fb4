"""Static checks of the Python code: no unused imports, undefined names or dead assignments."""

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_pyflakes_is_clean():
    cp = subprocess.run([sys.executable, "-m", "pyflakes", "src", "devkit", "tests", "bench"], cwd=ROOT,
                        capture_output=True, text=True, timeout=120)
    assert cp.returncode == 0, cp.stdout + cp.stderr
