"""The benchmark script runs end to end at its smoke-test size and reports consistent figures (no timing asserted)."""
import json
import math
import subprocess
import sys

import pytest

pytest.importorskip("numba")


def test_bench_quick_runs_and_reports_every_section(tmp_path):
    out = tmp_path / "bench.json"
    run = subprocess.run([sys.executable, "-m", "minirwkv.bench", "--quick", "--hf-steps", "0", "--json", str(out)],
                         capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr
    r = json.loads(out.read_text())
    assert set(r) >= {"wkv", "step", "precision", "environment"}
    assert r["wkv"]["copy_bandwidth_Bps"]["roofline"] > 0
    assert all(v < 1e-5 for v in r["wkv"]["maxdiff_relative"].values())  # numba == numpy while being timed
    assert r["step"]["tokens_per_s"] > 0 and 0 < r["step"]["matmul_share"] <= 1
    for row in r["precision"]["rows"]:  # the float32 table of docs/numerics.md, at small T
        assert all(math.isfinite(row[k]) and row[k] < 1e-5 for k in ("y", "gw", "gu", "gk", "gv"))
    assert r["environment"]["numba_threading_layer"] == "workqueue"
