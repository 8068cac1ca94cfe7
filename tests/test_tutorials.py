"""The tutorials run in CI, so they never rot: each one as a subprocess at the reduced size (MINIRWKV_QUICK=1).

A tutorial passes when it exits 0 and its closing comparison table ends with the pass marker of
tutorials/_common.py; when matplotlib is installed, its pictures must exist. Each file must also be a valid
jupytext percent-format script (opens as a notebook in Jupyter / VS Code).
"""
import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]
TUTORIALS = ROOT / "tutorials"
PATHS = sorted(TUTORIALS.glob("[0-9][0-9]_*.py"))
EXPECTED_PNGS = {  # pictures each tutorial saves into MINIRWKV_OUT when matplotlib is installed
    "01_token_shift_and_time_mixing.py": ["01_time_mix_init.png"],
    "02_wkv_three_ways.py": ["02_wkv_weights.png"],
    "05_data_and_the_optimizer.py": ["05_lr_schedule.png"],
    "06_training_loop_checkpoints_and_resume.py": ["06_loss_curve.png"],
    "07_rnn_mode.py": ["07_state_over_text.png"],
}
HAVE_MATPLOTLIB = importlib.util.find_spec("matplotlib") is not None

sys.path.insert(0, str(TUTORIALS))
import _common  # noqa: E402  (tutorials/_common.py: the pass marker and the table printer)


def test_the_four_core_tutorials_are_present():
    names = {p.name for p in PATHS}
    for name in ("01_token_shift_and_time_mixing.py", "02_wkv_three_ways.py", "03_backprop_through_wkv.py",
                 "04_block_forward_backward.py"):
        assert name in names, f"tutorials/{name} is missing"


def test_the_tutorials_are_numbered_in_reading_order():
    """01..NN without gaps or duplicates, each titled with its own number, every one listed in tutorials/README.md."""
    numbers = [int(p.name[:2]) for p in PATHS]
    assert numbers == list(range(1, len(PATHS) + 1)), [p.name for p in PATHS]
    readme = (TUTORIALS / "README.md").read_text()
    for number, path in zip(numbers, PATHS):
        assert path.read_text().startswith(f"# %% [markdown]\n# # Tutorial {number}:"), path.name
        assert f"`{path.name}`" in readme, f"tutorials/README.md does not list {path.name}"
    for name in EXPECTED_PNGS:
        assert (TUTORIALS / name).is_file(), f"EXPECTED_PNGS names {name}, which is not a tutorial"


@pytest.mark.parametrize("path", PATHS, ids=lambda p: p.stem)
def test_tutorial_runs_and_all_checks_pass(path, tmp_path):
    env = {**os.environ, "MINIRWKV_QUICK": "1", "MINIRWKV_OUT": str(tmp_path), "MPLBACKEND": "Agg",
           "NUMBA_NUM_THREADS": "2"}
    proc = subprocess.run([sys.executable, str(path)], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=300)
    output = proc.stdout + proc.stderr
    assert proc.returncode == 0, f"{path.name} exited with {proc.returncode}:\n{output[-4000:]}"
    lines = [line for line in proc.stdout.splitlines() if line.strip()]
    assert lines and lines[-1] == _common.PASS_MARKER, f"{path.name} lacks the pass marker:\n{output[-4000:]}"
    assert _common.FAIL_MARKER not in proc.stdout
    table = proc.stdout[proc.stdout.rindex("\ncompared"):]
    rows = [line for line in table.splitlines() if " | " in line][1:]  # below the header
    assert rows and all(line.rstrip().endswith("| ok") for line in rows), table
    if HAVE_MATPLOTLIB:
        for png in EXPECTED_PNGS.get(path.name, []):
            f = tmp_path / png
            assert f.is_file() and f.stat().st_size > 1000, f"{path.name} did not save {png}"
    else:
        assert "matplotlib is not installed" in proc.stdout or path.name not in EXPECTED_PNGS


@pytest.mark.parametrize("path", PATHS, ids=lambda p: p.stem)
def test_tutorial_is_a_jupytext_percent_script(path):
    text = path.read_text()
    assert text.startswith("# %% [markdown]\n# # "), f"{path.name} must open with a markdown cell and a title"
    cells = text.split("\n# %%")
    markdown = [c for c in cells if c.lstrip("# %").startswith("[markdown]")]
    assert markdown and len(markdown) < len(cells), f"{path.name} needs both markdown and code cells"
    for cell in markdown:  # prose lives in comments, so the file stays a runnable script
        body = cell.split("\n", 1)[1] if "\n" in cell else ""
        bad = [line for line in body.splitlines() if line and not line.startswith("#")]
        assert not bad, f"{path.name}: a markdown cell has a non-comment line: {bad[0]!r}"
    assert "import minirwkv" in text or "from minirwkv" in text, f"{path.name} must import the library"
    assert "checks.report()" in text.rsplit("# %%", 1)[1], f"{path.name} must end with the comparison table"


@pytest.mark.parametrize("path", PATHS, ids=lambda p: p.stem)
def test_jupytext_reads_it_as_a_notebook(path):
    jupytext = pytest.importorskip("jupytext")
    nb = jupytext.read(path)
    kinds = [c.cell_type for c in nb.cells]
    assert kinds[0] == "markdown" and nb.cells[0].source.startswith("# Tutorial")
    assert kinds.count("markdown") >= 3 and kinds.count("code") >= 3, kinds
    assert all(c.source.strip() for c in nb.cells), f"{path.name} has an empty cell"


def test_the_table_fails_on_a_mismatch(capsys):
    """The closing table must be able to fail: a real mismatch raises and prints the failure marker."""
    checks = _common.Checks("self-test")
    checks.close("equal", np.ones(3), np.ones(3))
    checks.close("off by 1e-3", np.ones(3) + 1e-3, np.ones(3))
    checks.true("a false fact", False, "detail")
    with pytest.raises(AssertionError, match="off by 1e-3.*a false fact"):
        checks.report()
    out = capsys.readouterr().out
    assert _common.FAIL_MARKER in out and _common.PASS_MARKER not in out
    assert out.count("FAIL\n") == 2
