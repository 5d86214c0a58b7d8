"""The benchmark harness still runs end to end (``bench/run.py --quick``) and prints every figure.

Timings are not checked here: benchmarks print numbers, they never fail CI on one. This keeps
`make bench` from rotting between the runs that refresh docs/benchmarks.md.
"""

from __future__ import annotations

import re
import shutil
import subprocess
import sys

import pytest

from tests.conftest import ROOT, needs_real_llama

pytestmark = [pytest.mark.real, needs_real_llama]


@pytest.mark.skipif(shutil.which("wrk") is None, reason="the bench drives cheap requests with wrk: apt-get install wrk")
def test_quick_bench_prints_a_row_for_every_figure():
    run = subprocess.run([sys.executable, str(ROOT / "bench" / "run.py"), "--quick"], cwd=ROOT,
                         capture_output=True, text=True, timeout=900)
    assert run.returncode == 0, run.stderr[-3000:]
    main_table, _, scale_table = run.stdout.partition("routerd CPU per request and per relayed event")
    rows = [line for line in main_table.splitlines() if line.startswith("| ")]
    figures = {m.group(1) for line in rows if (m := re.match(r"\| (\d+)\. ", line))}
    assert figures == {str(n) for n in range(1, 13)}, rows
    routerd_cells = [line.rstrip(" |").rsplit("| ", 1)[-1] for line in rows[1:]]
    assert all(cell and "nan" not in cell for cell in routerd_cells), rows
    # the scale table: CPU per request and per event, concurrency x resident stand-in backends
    scale = {m.group(1): line for line in scale_table.splitlines() if (m := re.match(r"\| (\d+) \| ", line))}
    assert sorted(scale, key=int) == ["1", "16", "64", "256"], scale_table
    assert all(line.count("ms/req") == 3 and line.count("ms/event") == 3 for line in scale.values()), scale_table


def test_short_soak_loses_nothing_and_leaves_nothing():
    """`bench/soak.py` for 40 s with a kill and a reload every 10 s: the harness still runs, no
    request hangs, routerd exits 0 on SIGTERM and no llama-server outlives it."""
    run = subprocess.run([sys.executable, str(ROOT / "bench" / "soak.py"), "--minutes", "0.67", "--kill-every", "10",
                          "--reload-every", "10"], cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]
    figures = dict(re.findall(r"^\| ([^|]+?) \| ([^|]+?) \|$", run.stdout, re.MULTILINE))
    assert figures["hung requests (must be 0)"] == "0", run.stdout
    assert figures["routerd exit status after SIGTERM"] == "0", run.stdout
    assert figures["llama-server processes left after stop (must be 0)"].startswith("0 of "), run.stdout
    assert int(figures["llama-servers killed with SIGKILL"]) >= 2, run.stdout
    assert "Tracebacks in routerd's log: 0" in run.stdout
