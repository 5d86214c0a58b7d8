"""The benchmark harness still runs end to end (``bench/run.py --quick``) and prints every figure.

Timings are not checked here: benchmarks print numbers, they never fail CI on one. This keeps
`make bench` from rotting between the runs that refresh docs/benchmarks.md.
"""

from __future__ import annotations

import re
import subprocess
import sys

import pytest

from tests.conftest import ROOT

pytestmark = pytest.mark.real


def test_quick_bench_prints_a_row_for_every_figure():
    run = subprocess.run([sys.executable, str(ROOT / "bench" / "run.py"), "--quick"], cwd=ROOT,
                         capture_output=True, text=True, timeout=900)
    assert run.returncode == 0, run.stderr[-3000:]
    rows = [line for line in run.stdout.splitlines() if line.startswith("| ")]
    figures = {m.group(1) for line in rows if (m := re.match(r"\| (\d)\. ", line))}
    assert figures == {str(n) for n in range(1, 9)}, rows
    routerd_cells = [line.rstrip(" |").rsplit("| ", 1)[-1] for line in rows[1:]]
    assert all(cell and "nan" not in cell for cell in routerd_cells), rows
