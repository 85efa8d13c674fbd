"""``grad-guard demo`` (grad_guard.demo): runs, outputs, table, options and errors."""

from __future__ import annotations

import contextlib
import io
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from grad_guard import demo
from grad_guard.cli import main
from grad_guard.experiments import default_experiments

from helpers import event_dirs, read_scalars

pytest.importorskip("sklearn")
pytest.importorskip("matplotlib")
pytest.importorskip("rich")
from matplotlib.image import imread

NAMES = [exp.name for exp in default_experiments()]


def _row_cells(text: str, run: dict) -> list[str]:
    """The printed table row of ``run``, split into cells (the last one is the diagnosis)."""
    ratio = f"{run['grad_ratio']:.1e}"
    lines = [
        line
        for line in text.splitlines()
        if line.startswith(run["name"] + " ") and f" {ratio} " in line
    ]
    assert len(lines) == 1, f"no single table row for {run['name']!r} in:\n{text}"
    cells = lines[0].split(maxsplit=len(demo.COLUMNS) - 1)
    assert len(cells) == len(demo.COLUMNS), lines[0]
    return cells


@pytest.fixture(scope="module")
def quick(tmp_path_factory):
    """``grad-guard demo --quick`` run once, in-process, with its progress bar."""
    out = tmp_path_factory.mktemp("demo") / "out"
    stdout, stderr = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(stdout), contextlib.redirect_stderr(stderr):
        code = main(["demo", "--quick", "--out", str(out)])
    results = json.loads((out / demo.RESULTS_JSON).read_text())
    return code, out, stdout.getvalue(), stderr.getvalue(), results


def test_quick_demo_exits_zero_and_trains_every_run(quick):
    code, out, printed, _, results = quick
    assert code == 0
    runs = {run["name"]: run for run in results["runs"]}
    assert list(runs) == NAMES
    assert all(run["steps"] == demo.QUICK_STEPS for run in runs.values())
    assert all(run["steps_run"] == demo.QUICK_STEPS for run in runs.values())
    assert f"tensorboard --logdir {out}" in printed
    assert "480/480" in printed  # the progress bar over the whole matrix reached its end


def test_quick_demo_writes_event_files_per_run(quick):
    _, out, _, _, results = quick
    dirs = event_dirs(str(out))
    for run in results["runs"]:
        run_dir = out / run["name"]
        assert [d for d in dirs if Path(d).parent == run_dir], run["name"]
        scalars = read_scalars(run["log_dir"])
        assert any(tag.startswith("grad_norm/") for tag in scalars), run["name"]
        assert "grad_guard/anomalies/vanishing" in scalars
        # the health report went into the run folder
        assert (Path(run["log_dir"]) / "grad_guard_report.md").is_file()
    clipped = read_scalars(results["runs"][NAMES.index("relu-he-d12-clip-norm")]["log_dir"])
    assert any(tag.startswith("grad_guard/clip") for tag in clipped)


def test_quick_demo_writes_the_comparison_png_and_the_markdown(quick):
    _, out, _, _, _ = quick
    png = out / demo.FIGURE_NAME
    image = imread(png)
    assert image.ndim == 3 and image.shape[0] > 300 and image.shape[1] > 900
    assert png.stat().st_size < 300_000
    markdown = (out / demo.RESULTS_MD).read_text()
    assert markdown.count("\n| ") == len(NAMES) + 1  # header + one line per run
    assert "## What each row teaches" in markdown


def test_table_flags_the_vanishing_row_and_not_the_residual_row(quick):
    _, _, printed, _, results = quick
    runs = {run["name"]: run for run in results["runs"]}

    sigmoid = runs["sigmoid-default"]
    assert sigmoid["grad_ratio"] < 1e-6
    assert sigmoid["counts"]["vanishing"] > 0 or any(
        rule.startswith("vanishing") for rule in sigmoid["rules"]
    )
    assert "vanishing" in sigmoid["problems"]
    cells = _row_cells(printed, sigmoid)
    assert cells[3] == str(sigmoid["counts"]["vanishing"])  # the vanishing column
    assert "vanishing" in cells[-1]  # the diagnosis column

    residual = runs["residual-bn"]
    assert 0.1 < residual["grad_ratio"] < 10
    assert residual["problems"] == [] and residual["rules"] == []
    assert residual["counts"]["vanishing"] == residual["counts"]["exploding"] == 0
    assert residual["accuracy"] > 0.5
    cells = _row_cells(printed, residual)
    assert cells[3:6] == ["0", "0", "0"] and cells[-1].strip() == "healthy"


def test_unclipped_rows_observe_and_clipped_rows_clip(quick):
    _, _, _, _, results = quick
    for run in results["runs"]:
        if run["clip_algorithm"] is None:
            assert run["clipped_fraction"] is None, run["name"]
        else:
            assert 0.0 < run["clipped_fraction"] <= 1.0, run["name"]


def test_per_run_reports_and_anomaly_warnings_stay_quiet(quick):
    _, _, printed, errors, _ = quick
    assert "grad_guard report:" not in printed  # each run's report header
    assert "GradientAnomalyWarning" not in errors
    assert "What each row teaches" in printed


def test_help_explains_the_experiment(capsys):
    assert main(["demo", "--help"]) == 0
    text = capsys.readouterr().out
    assert "vanishing" in text.lower() and "exploding" in text.lower()
    for option in ("--quick", "--out", "--steps", "--depth", "--seed", "--no-progress"):
        assert option in text
    for name in NAMES:
        assert name in text


@pytest.mark.parametrize(
    "argv, option",
    [(["--steps", "0"], "--steps"), (["--depth", "1"], "--depth"), (["--steps", "x"], "--steps")],
)
def test_invalid_option_exits_non_zero_naming_it(argv, option, tmp_path, capsys):
    assert main(["demo", *argv, "--out", str(tmp_path / "out")]) != 0
    error = capsys.readouterr().err
    assert f"argument {option}" in error
    assert not (tmp_path / "out").exists()


def test_missing_dependency_names_the_demo_extra(monkeypatch, tmp_path, capsys):
    monkeypatch.setitem(sys.modules, "sklearn", None)  # find_spec then reports it missing
    assert main(["demo", "--quick", "--out", str(tmp_path / "out")]) == 1
    error = capsys.readouterr().err
    assert "scikit-learn" in error and 'pip install "grad-guard[demo]"' in error
    assert not (tmp_path / "out").exists()


def test_plain_text_table_without_rich(monkeypatch, tmp_path, capsys):
    monkeypatch.setitem(sys.modules, "rich", None)
    monkeypatch.setitem(sys.modules, "rich.console", None)
    out = tmp_path / "out"
    assert demo.main(["--steps", "2", "--depth", "3", "--out", str(out), "--no-progress"]) == 0
    printed = capsys.readouterr().out
    header = next(line for line in printed.splitlines() if line.startswith("run "))
    assert all(column in header for column in demo.COLUMNS)
    assert "─" not in printed  # no rich rule under the header
    runs = json.loads((out / demo.RESULTS_JSON).read_text())["runs"]
    assert [run["steps_run"] for run in runs] == [2] * len(NAMES)


def test_console_script_runs_the_demo(tmp_path):
    script = shutil.which("grad-guard")
    command = [script] if script else [sys.executable, "-m", "grad_guard.cli"]
    out = tmp_path / "out"
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    done = subprocess.run(
        [*command, "demo", "--steps", "3", "--depth", "4", "--no-progress", "--out", str(out)],
        capture_output=True,
        text=True,
        timeout=240,
        env=env,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert f"tensorboard --logdir {out}" in done.stdout
    assert (out / demo.FIGURE_NAME).is_file()
    assert len(event_dirs(str(out))) >= len(NAMES)
