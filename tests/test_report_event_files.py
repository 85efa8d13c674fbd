"""Reports built from event files: damaged files, the run's own settings, events, step ranges."""

import json
import math
import os

from grad_guard.callbacks.monitor import GradientNormMonitor
from grad_guard.report.command import main as report
from report_runs import flip, write_run

from helpers import TinyModule, make_loader, trainer


def test_a_file_damaged_half_way_is_reported_as_a_partial_read(tmp_path, capsys):
    path, sizes = write_run(tmp_path / "run")
    data = flip(path, sizes[14] + 20)  # a byte inside the records of step 15
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
    path, _ = write_run(tmp_path / "run")
    flip(path, 9)  # the first record's length checksum
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
        write_run(
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
    write_run(tmp_path / "a", grad=inf, config=AUTOCLIP)
    amp = report_from_event_files(str(tmp_path / "a"))
    finding = amp.findings[amp.rules().index("nonfinite_amp")]  # 16-mixed, from the config
    assert "on_nonfinite='skip'" not in " ".join(finding.advice)
    assert "already acts on them (on_nonfinite='skip')" in " ".join(finding.evidence)
    fp32 = dict(AUTOCLIP, precision="32-true", clipping=None, detection=None)
    write_run(tmp_path / "b", grad=inf, config=fp32)
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
    write_run(tmp_path / "run", events=events)
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

    write_run(tmp_path / "run", steps=range(3, 2000, 4), layers=("a", "b"))
    thinned = report_from_event_files(str(tmp_path / "run"), max_steps=16)
    assert thinned.steps == (3, 1999) and thinned.logged_steps == 500
    assert report([str(tmp_path / "run")]) == 0
    assert "500 logged steps (steps 3-1999)" in capsys.readouterr().out


def test_a_real_fit_logs_the_settings_the_report_reads_back(tmp_path, capsys):
    from grad_guard import AutoClip, GradientAnomalyDetection, GradientClipping
    from grad_guard.report import read_run

    callbacks = [
        GradientNormMonitor(log_every_n_steps=2, image_every_n_steps=None),
        GradientAnomalyDetection(log_every_n_steps=2),
        GradientClipping(AutoClip(), log_every_n_steps=2),
    ]
    t = trainer(tmp_path, max_steps=8, callbacks=callbacks)
    t.fit(TinyModule(), make_loader())
    run = read_run(t.logger.log_dir)
    assert run.complete and run.config_error is None
    assert run.config.clip_algorithm == "AutoClip" and run.config.precision == "32-true"
    assert run.config.action("on_nonfinite") == "skip"
    assert report([t.logger.log_dir]) == 0
    assert "run settings: precision 32-true; clipping AutoClip(" in capsys.readouterr().out
