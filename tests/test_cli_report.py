import json
import math
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


# ------------------------------------------------ runs written with SummaryWriter directly


def _write_run(
    folder,
    steps=range(30),
    layers=("fc1", "fc2", "fc3", "head"),
    grad=lambda step, i: 10.0 ** (i - 3),
    total=lambda step: 1.0,
    config=None,
    events=(),
):
    """A grad_guard-style run: per-layer norms, the total, an optional config and events.

    Flushes after each step and returns ``(event file, {step: file size after that step})``.
    """
    sizes = {}
    with SummaryWriter(str(folder)) as writer:
        if config is not None:
            writer.add_text("grad_guard/config", json.dumps(config), 0)
        for step in steps:
            writer.add_scalar("grad_guard/total_grad_norm", total(step), step)
            for i, name in enumerate(layers):
                writer.add_scalar(f"grad_norm/{name}", grad(step, i), step)
            for event_step, text in events:
                if event_step == step:
                    writer.add_text("grad_guard/anomaly_events", text, step)
            writer.flush()
            sizes[step] = os.path.getsize(writer.file_writer.event_writer._file_name)
        path = writer.file_writer.event_writer._file_name
    return path, sizes


def _flip(path, offset):
    """Invert the byte at ``offset`` of ``path``; returns the new content."""
    with open(path, "rb") as handle:
        data = bytearray(handle.read())
    data[offset] ^= 0xFF
    with open(path, "wb") as handle:
        handle.write(bytes(data))
    return data


def test_a_folder_of_runs_gets_one_summary_line_and_one_report_per_run(tmp_path, capsys):
    _write_run(tmp_path / "healthy", grad=lambda step, i: 1.0)
    _write_run(tmp_path / "vanishing", grad=lambda step, i: 10.0 ** (4 * i - 12))
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


def test_a_file_damaged_half_way_is_reported_as_a_partial_read(tmp_path, capsys):
    path, sizes = _write_run(tmp_path / "run")
    data = _flip(path, sizes[14] + 20)  # a byte inside the records of step 15
    assert report([str(tmp_path / "run")]) == 0
    printed = capsys.readouterr().out
    assert "15 logged steps (steps 0-14)" in printed  # 30 were written
    assert (
        f"NOTICE: {os.path.basename(path)}: reading stopped at byte {sizes[14]} of {len(data)}"
        in printed
    )
    assert "steps 0-14 read" in printed and "fails its checksum" in printed
    assert "PARTIAL READ" in printed
    saved = json.loads((tmp_path / "run" / "grad_guard_report.json").read_text())
    assert saved["complete"] is False and saved["logged_steps"] == 15
    assert saved["source"]["files"][0]["bytes_read"] == sizes[14]

    with open(path, "r+b") as handle:  # cut off inside step 15: still partial, said so
        handle.truncate(sizes[14] + 7)
    assert report([str(tmp_path / "run"), "--overwrite"]) == 0
    assert "the file ends inside a record header" in capsys.readouterr().out


def test_a_file_with_nothing_usable_exits_nonzero(tmp_path, capsys):
    path, _ = _write_run(tmp_path / "run")
    _flip(path, 9)  # the first record's length checksum
    assert report([str(tmp_path)]) == 1
    captured = capsys.readouterr()
    assert "nothing usable could be read" in captured.err
    assert "run: UNREADABLE" in captured.out and "reading stopped at byte 0" in captured.out


AUTOCLIP = {
    "version": 1,
    "precision": "16-mixed",
    "log_every_n_steps": 1,
    "clipping": {"algorithm": "AutoClip", "repr": "AutoClip(percentile=10.0, window=1000)"},
    "detection": {"on_nonfinite": "skip", "on_exploding": "warn", "on_vanishing": "warn"},
    "monitor": True,
    "activations": False,
}


def test_advice_never_recommends_what_the_run_already_uses(tmp_path):
    from grad_guard.report import report_from_event_files

    def drifting(folder, config):
        _write_run(
            folder,
            steps=range(40),
            grad=lambda s, i: 1.1**s,
            total=lambda s: 2 * 1.1**s,
            config=config,
        )
        return report_from_event_files(str(folder))

    plain = drifting(tmp_path / "plain", None)  # no config logged: as before
    advice = " ".join(plain.findings[plain.rules().index("exploding")].advice)
    assert "clip with AutoClip (GradientClipping(AutoClip()))" in advice
    assert plain.precision is None and plain.config is None

    own = drifting(tmp_path / "autoclip", AUTOCLIP)
    finding = own.findings[own.rules().index("exploding")]
    advice = " ".join(finding.advice)
    assert "tune the run's AutoClip" in advice and "switch from AutoClip to ZClip" in advice
    assert "clip with AutoClip" not in advice and "GradientClipping(AutoClip())" not in advice
    assert "already clips with AutoClip(percentile=10.0, window=1000)" in " ".join(finding.evidence)
    assert own.precision == "16-mixed"  # from the config: no --precision needed
    assert own.to_dict()["config"]["clipping"]["algorithm"] == "AutoClip"


def test_nonfinite_advice_respects_the_runs_precision_and_skip_action(tmp_path):
    from grad_guard.report import report_from_event_files

    inf = lambda s, i: math.inf if (s, i) == (20, 1) else 1.0  # noqa: E731
    _write_run(tmp_path / "a", grad=inf, config=AUTOCLIP)
    amp = report_from_event_files(str(tmp_path / "a"))
    finding = amp.findings[amp.rules().index("nonfinite_amp")]  # 16-mixed, from the config
    assert "on_nonfinite='skip'" not in " ".join(finding.advice)
    assert "already acts on them (on_nonfinite='skip')" in " ".join(finding.evidence)
    fp32 = dict(AUTOCLIP, precision="32-true", clipping=None, detection=None)
    _write_run(tmp_path / "b", grad=inf, config=fp32)
    full = report_from_event_files(str(tmp_path / "b"))
    advice = " ".join(full.findings[full.rules().index("nonfinite")].advice)
    assert "add GradientAnomalyDetection(on_nonfinite='skip')" in advice


def test_logged_anomaly_events_are_shown_not_only_counted(tmp_path, capsys):
    events = [
        (
            12,
            "**exploding** at step 12 — action `skip`\n\n| layer | gradient norm |\n|---|---|\n"
            "| `fc2` | 3e+03 |\n\nthreshold 10 (max_total_norm); total norm 3e+03",
        ),
        (
            20,
            "**nonfinite** at step 20 — action `skip`\n\n| layer | gradient norm |\n|---|---|\n"
            "| `fc1` | nan |\n\nlikely origin `fc1`",
        ),
    ]
    _write_run(tmp_path / "run", events=events)
    assert report([str(tmp_path / "run")]) == 0
    printed = capsys.readouterr().out
    assert "Events (2):" in printed
    assert "step 12: exploding (action skip) in fc2 (3e+03); total norm 3e+03" in printed
    assert "step 20: nonfinite (action skip) in fc1 (nan); likely origin fc1" in printed
    saved = json.loads((tmp_path / "run" / "grad_guard_report.json").read_text())
    assert [(e["step"], e["kind"], e["layers"]) for e in saved["events"]] == [
        (12, "exploding", ["fc2"]),
        (20, "nonfinite", ["fc1"]),
    ]
    assert saved["events"][1]["values"] == [None]  # NaN, JSON-safe


def test_step_ranges_are_the_first_and_last_logged_step(tmp_path, capsys):
    from grad_guard.report import report_from_event_files

    _write_run(tmp_path / "run", steps=range(3, 2000, 4), layers=("a", "b"))
    thinned = report_from_event_files(str(tmp_path / "run"), max_steps=16)
    assert thinned.steps == (3, 1999) and thinned.logged_steps == 500
    assert report([str(tmp_path / "run")]) == 0
    assert "500 logged steps (steps 3-1999)" in capsys.readouterr().out


@pytest.mark.parametrize(
    ("option", "value", "message"),
    [
        ("--window", "0", "--window must be an integer >= 1, got 0"),
        ("--max-rows", "-3", "--max-rows must be an integer >= 1, got -3"),
        ("--precision", "17-mixed", "--precision must be one of 64-true"),
    ],
)
def test_bad_option_values_are_refused(tmp_path, capsys, option, value, message):
    _write_run(tmp_path / "run")
    assert report([str(tmp_path / "run"), option, value]) == 2
    err = capsys.readouterr().err
    assert message in err and (value in err)
    assert not (tmp_path / "run" / "grad_guard_report.json").exists()


def test_a_real_fit_logs_the_settings_the_report_reads_back(tmp_path, capsys):
    from grad_guard import AdaptiveGradientClipping, AutoClip, GradientAnomalyDetection
    from grad_guard.report import read_run

    callbacks = [
        GradientNormMonitor(log_every_n_steps=2, image_every_n_steps=None),
        GradientAnomalyDetection(log_every_n_steps=2),
        AdaptiveGradientClipping(AutoClip(), log_every_n_steps=2),
    ]
    t = trainer(tmp_path, max_steps=8, callbacks=callbacks)
    t.fit(TinyModule(), make_loader())
    run = read_run(t.logger.log_dir)
    assert run.complete and run.config_error is None
    assert run.config.clip_algorithm == "AutoClip" and run.config.precision == "32-true"
    assert run.config.action("on_nonfinite") == "skip"
    assert report([t.logger.log_dir]) == 0
    assert "run settings: precision 32-true; clipping AutoClip(" in capsys.readouterr().out
