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
    assert set(r) >= {"wkv", "step", "precision", "scaling", "environment"}
    assert r["wkv"]["copy_bandwidth_Bps"]["roofline"] > 0
    assert all(v < 1e-5 for v in r["wkv"]["maxdiff_relative"].values())  # numba == numpy while being timed
    assert r["step"]["tokens_per_s"] > 0 and 0 < r["step"]["matmul_share"] <= 1
    for row in r["precision"]["rows"]:  # the float32 table of docs/numerics.md, at small T
        assert all(math.isfinite(row[k]) and row[k] < 1e-5 for k in ("y", "gw", "gu", "gk", "gv"))
    assert r["environment"]["numba_threading_layer"] == "workqueue"
    scaling = r["scaling"]  # every figure at 1 thread, all cores, and both again beside the busy process
    assert isinstance(scaling["idle"], bool) and scaling["cores"] >= 1
    for which in ("one", "all", "busy_one", "busy_all"):
        for key in ("sgemm_GFLOPs", "step_tok_s", "rnn_tok_s", "batch8_tok_s", "prefill_tok_s", "rnn_roofline_pct"):
            assert scaling[which][key] > 0, (which, key)
    assert scaling["pools"]["blas_threads"] and set(scaling["pools"]["blas_threads"]) == {1}
    assert scaling["pools"]["numba_threads"] == min(scaling["cores"], scaling["pools"]["numba_pool_size"])
    if scaling["cores"] > 1 and "skipped" not in scaling["data_parallel"]:  # mpi4py and mpiexec installed
        assert all(v and v > 0 for v in scaling["data_parallel"].values()), scaling["data_parallel"]
    assert "busy:" in run.stdout and "scaling" in run.stdout
