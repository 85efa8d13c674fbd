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
    out = tmp_path / "report"
    assert main(["report", root, "--out", str(out), "--max-rows", "50"]) == 0
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


def test_report_writes_into_the_run_folder_by_default(sigmoid_logdir, capsys):
    _, run_dir = sigmoid_logdir
    assert main(["report", run_dir]) == 0
    assert os.path.exists(os.path.join(run_dir, "gradient_heatmap.png"))
    assert os.path.exists(os.path.join(run_dir, "grad_guard_report.md"))
    assert "wrote" in capsys.readouterr().out


def test_counters_and_clipping_come_back_from_the_event_files(tmp_path, capsys):
    from grad_guard import AdaptiveGradientClipping, GradientAnomalyDetection, NormClip
    from grad_guard.history import GradientHistory

    detection = GradientAnomalyDetection(log_every_n_steps=2)
    clipping = AdaptiveGradientClipping(NormClip(1e-4), log_every_n_steps=2)
    monitor = GradientNormMonitor(log_every_n_steps=2, image_every_n_steps=None)
    t = trainer(tmp_path, max_steps=8, callbacks=[monitor, detection, clipping])
    t.fit(TinyModule(), make_loader())
    history = GradientHistory.from_event_files(str(tmp_path))
    assert history.clipped_fraction == pytest.approx(clipping.clipped_fraction) == 1.0
    for name, count in detection.counts.items():
        assert history.counts[name] == count
    assert main(["report", str(tmp_path)]) == 0
    printed = capsys.readouterr().out
    assert "clipped 100.0%" in printed and "AutoClip" in printed


def test_no_event_files_exits_nonzero_with_a_clear_message(tmp_path, capsys):
    assert main(["report", str(tmp_path)]) == 2
    assert "no TensorBoard event files" in capsys.readouterr().err
    assert main(["report", str(tmp_path / "missing")]) == 2
    assert "is not a directory" in capsys.readouterr().err
    with SummaryWriter(str(tmp_path / "other")) as writer:
        writer.add_scalar("loss", 1.0, 0)
    assert main(["report", str(tmp_path)]) == 1
    assert "no grad_guard gradient norms" in capsys.readouterr().err


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
