import json
import os
import subprocess
import sys
import types

import pytest
import torch
from torch.utils.tensorboard import SummaryWriter

import grad_guard
from grad_guard.callbacks.monitor import GradientNormMonitor
from grad_guard.cli import main
from grad_guard.models import DeepMLP, ImageClassifier
from grad_guard.report.command import main as report
from report_runs import write_run

from helpers import TinyModule, make_loader, trainer

pytest.importorskip("matplotlib")
from matplotlib.image import imread

from grad_guard.plots import heatmap_size


@pytest.fixture(scope="module")
def sigmoid_logdir(tmp_path_factory):
    """A finished run of an 8-layer sigmoid MLP logged to TensorBoard (no pictures)."""
    root = tmp_path_factory.mktemp("cli_run")
    torch.manual_seed(0)
    module = ImageClassifier(DeepMLP(16, 4, depth=8, width=16, activation="sigmoid"), lr=0.1)
    monitor = GradientNormMonitor(log_every_n_steps=1, image_every_n_steps=None)
    t = trainer(root, max_steps=6, callbacks=[monitor])
    t.fit(module, make_loader(n=96, features=16, classes=4, batch_size=16))
    return str(root), t.logger.log_dir


def test_report_prints_the_table_and_writes_the_png(sigmoid_logdir, tmp_path, capsys):
    root, run_dir = sigmoid_logdir
    assert report([root, "--out", str(tmp_path / "report"), "--max-rows", "50"]) == 0
    out = tmp_path / "report" / os.path.relpath(run_dir, root)  # one sub-folder per run
    printed = capsys.readouterr().out
    assert run_dir in printed
    for word in ("layer", "min", "median", "max", "update ratio", "model.fc1", "model.head"):
        assert word in printed
    # diagnosis from the event files alone (no model): vanishing, with what to check
    assert "Vanishing" in printed and "ReLU" in printed
    heatmap = imread(str(out / "gradient_heatmap.png"))
    width, height = heatmap_size(8)
    assert heatmap.shape[:2] == (height, width)
    assert (out / "gradient_flow.png").exists()
    data = json.loads((out / "grad_guard_report.json").read_text())
    assert [row["name"] for row in data["layers"]] == [f"model.fc{i}" for i in range(1, 8)] + [
        "model.head"
    ]
    assert data["logged_steps"] == 6
    assert "vanishing_activation" in [f["rule"] for f in data["findings"]]


def test_report_writes_into_the_run_folder_and_never_overwrites_silently(sigmoid_logdir, capsys):
    _, run_dir = sigmoid_logdir
    assert report([run_dir]) == 0
    markdown = os.path.join(run_dir, "grad_guard_report.md")
    assert os.path.exists(os.path.join(run_dir, "gradient_heatmap.png"))
    assert os.path.exists(markdown)
    assert f"wrote {os.path.join(run_dir, 'grad_guard_report.json')}" in capsys.readouterr().out
    with open(markdown, "w") as handle:
        handle.write("the end-of-fit report, which saw the model\n")
    assert report([run_dir]) == 0  # kept, and it says so
    assert "kept the existing report in " + run_dir in capsys.readouterr().out
    with open(markdown) as handle:
        assert handle.read() == "the end-of-fit report, which saw the model\n"
    assert report([run_dir, "--overwrite"]) == 0
    assert "replaced " + markdown.replace(".md", ".json") in capsys.readouterr().out
    with open(markdown) as handle:
        assert "## Diagnosis" in handle.read()


def test_counters_and_clipping_come_back_from_the_event_files(tmp_path, capsys):
    from grad_guard import GradientAnomalyDetection, GradientClipping, NormClip
    from grad_guard.history import GradientHistory

    detection = GradientAnomalyDetection(log_every_n_steps=2)
    clipping = GradientClipping(NormClip(1e-4), log_every_n_steps=2)
    monitor = GradientNormMonitor(log_every_n_steps=2, image_every_n_steps=None)
    t = trainer(tmp_path, max_steps=8, callbacks=[monitor, detection, clipping])
    t.fit(TinyModule(), make_loader())
    history = GradientHistory.from_event_files(str(tmp_path))
    assert history.clipped_fraction == pytest.approx(clipping.clipped_fraction) == 1.0
    for name, count in detection.counts.items():
        assert history.counts[name] == count
    assert report([str(tmp_path)]) == 0
    printed = capsys.readouterr().out
    assert "clipped 100.0%" in printed and "AutoClip" in printed


def test_no_event_files_exits_nonzero_with_a_clear_message(tmp_path, capsys):
    assert report([str(tmp_path)]) == 2
    assert "no TensorBoard event files" in capsys.readouterr().err
    assert report([str(tmp_path / "missing")]) == 2
    assert "is not a directory" in capsys.readouterr().err
    with SummaryWriter(str(tmp_path / "other")) as writer:
        writer.add_scalar("loss", 1.0, 0)
    assert report([str(tmp_path)]) == 1
    captured = capsys.readouterr()
    assert "no grad_guard gradient norms" in captured.err
    assert "other: no grad_guard data, skipped" in captured.out


def test_version(capsys):
    assert main(["--version"]) == 0
    assert capsys.readouterr().out.strip() == f"grad-guard {grad_guard.__version__}"
    done = subprocess.run(
        [sys.executable, "-m", "grad_guard.cli", "--version"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 0 and grad_guard.__version__ in done.stdout


def test_demo_subcommand_hands_its_arguments_to_grad_guard_demo(monkeypatch, capsys):
    seen = []
    fake = types.ModuleType("grad_guard.demo")
    fake.main = lambda argv: seen.append(argv) or 3
    monkeypatch.setitem(sys.modules, "grad_guard.demo", fake)
    assert main(["demo", "--steps", "5", "vanishing"]) == 3
    assert seen == [["--steps", "5", "vanishing"]]

    monkeypatch.setitem(sys.modules, "grad_guard.demo", None)  # not installed
    assert main(["demo"]) == 1
    assert "grad_guard.demo is not available" in capsys.readouterr().err


def test_a_folder_of_runs_gets_one_summary_line_and_one_report_per_run(tmp_path, capsys):
    write_run(tmp_path / "healthy", grad=lambda step, i: 1.0)
    write_run(tmp_path / "vanishing", grad=lambda step, i: 10.0 ** (4 * i - 12))
    with SummaryWriter(str(tmp_path / "not_grad_guard")) as writer:
        writer.add_scalar("loss", 1.0, 0)
    assert report([str(tmp_path), "--out", str(tmp_path / "out")]) == 0
    printed = capsys.readouterr().out
    assert "== run 1/3" in printed and "== run 3/3" in printed
    summary = printed[printed.index("summary (3 run(s)") :].splitlines()[1:]
    assert len(summary) == 3
    assert summary[0].strip().startswith("healthy: 4 layers, 30 logged steps (steps 0-29); healthy")
    assert summary[1].strip().startswith("not_grad_guard: no grad_guard data, skipped")
    assert "vanishing: 4 layers" in summary[2] and "problem(s): vanishing_activation" in summary[2]
    for name in ("healthy", "vanishing"):  # each run its own files, and the paths are printed
        path = tmp_path / "out" / name / "grad_guard_report.json"
        assert str(path) in printed
        assert json.loads(path.read_text())["source"]["run_dir"] == str(tmp_path / name)
    assert not (tmp_path / "out" / "not_grad_guard").exists()


@pytest.mark.parametrize(
    ("option", "value", "message"),
    [
        ("--window", "0", "--window must be an integer >= 1, got 0"),
        ("--max-rows", "-3", "--max-rows must be an integer >= 1, got -3"),
        ("--precision", "17-mixed", "--precision must be one of 64-true"),
    ],
)
def test_bad_option_values_are_refused(tmp_path, capsys, option, value, message):
    write_run(tmp_path / "run")
    assert report([str(tmp_path / "run"), option, value]) == 2
    err = capsys.readouterr().err
    assert message in err and (value in err)
    assert not (tmp_path / "run" / "grad_guard_report.json").exists()
