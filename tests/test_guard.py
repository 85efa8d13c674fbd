import pytest
import torch

from grad_guard import (
    GradGuard,
    GradientAnomalyDetection,
    GradientClipping,
    GradientNormMonitor,
    NormClip,
)

from helpers import TinyModule, make_loader, read_scalars, trainer


def _fit(tmp_path, callbacks, steps=8, seed=0):
    torch.manual_seed(seed)
    model = TinyModule(lr=0.5)
    t = trainer(tmp_path, max_steps=steps, log_every_n_steps=2, callbacks=callbacks)
    t.fit(model, make_loader(n=128))
    return t, model, read_scalars(t.logger.log_dir)


def test_guard_equals_stand_alone_callbacks_with_one_pass_per_step(tmp_path):
    guard = GradGuard(clipping=NormClip(0.05), report=False)
    t_guard, guard_model, guard_logs = _fit(tmp_path / "guard", [guard])
    assert t_guard.grad_guard_session.engine.passes == 8

    parts = [
        GradientAnomalyDetection(),
        GradientClipping(NormClip(0.05)),
        GradientNormMonitor(),
    ]
    t_parts, parts_model, parts_logs = _fit(tmp_path / "parts", parts)
    # three stand-alone callbacks still read the gradients once per step
    assert t_parts.grad_guard_session.engine.passes == 8

    assert set(guard_logs) == set(parts_logs)
    for tag, values in parts_logs.items():
        for step, value in values.items():
            assert guard_logs[tag][step] == pytest.approx(value, rel=1e-6), tag
    # the clipping really happened: the post-clip norm is the threshold, below the pre-clip one
    pre, post = guard_logs["grad_guard/clip/pre_norm"], guard_logs["grad_guard/clip/post_norm"]
    for step in pre:
        assert post[step] == pytest.approx(0.05, rel=1e-4)
        assert pre[step] > 0.05
    for a, b in zip(guard_model.parameters(), parts_model.parameters()):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_guard_logs_pre_clip_norms_and_writes_report(tmp_path):
    guard = GradGuard(clipping=NormClip(0.05))
    t, _, logs = _fit(tmp_path, [guard])
    assert logs["grad_guard/total_grad_norm"][0] == pytest.approx(
        logs["grad_guard/clip/pre_norm"][0], rel=1e-6
    )
    assert logs["grad_guard/total_grad_norm"][0] > 0.05
    report = guard.last_report
    assert report is not None and [row.name for row in report.layers] == ["net.0", "net.2", "net.4"]
    import json
    import os

    with open(os.path.join(t.logger.log_dir, "grad_guard_report.json")) as f:
        data = json.load(f)
    assert data["totals"]["clipped_fraction"] == pytest.approx(1.0)
    for picture in ("gradient_heatmap.png", "gradient_flow.png"):
        assert os.path.getsize(os.path.join(t.logger.log_dir, picture)) > 1000


def test_parts_can_be_turned_off(tmp_path):
    guard = GradGuard(monitor=False, detection=False, clipping="norm", report=False)
    assert [type(p).__name__ for p in guard.parts] == ["GradientClipping"]
    _, _, logs = _fit(tmp_path, [guard], steps=2)
    assert not any(tag.startswith("grad_norm/") for tag in logs)
    assert "grad_guard/clip/pre_norm" in logs


def test_state_dict_round_trip_and_a_key_that_survives_changed_options():
    a = GradGuard()
    b = GradGuard(clipping="autoclip")
    assert a.state_key == b.state_key
    state = a.state_dict()
    assert set(state) == {"monitor", "detection", "clipping"}
    with pytest.warns(UserWarning, match="its statistics start afresh"):
        b.load_state_dict(state)  # ZClip's statistics do not fit AutoClip


@pytest.mark.parametrize(
    ("kwargs", "argument"),
    [
        ({"monitor": 3}, "monitor"),
        ({"detection": "yes"}, "detection"),
        ({"clipping": 1.0}, "clipping"),
    ],
)
def test_invalid_parts(kwargs, argument):
    with pytest.raises(ValueError, match=f"`{argument}`"):
        GradGuard(**kwargs)


def test_report_written_but_not_printed(tmp_path, capsys):
    import os

    guard = GradGuard(clipping=None, print_report=False)
    t, _, _ = _fit(tmp_path, [guard], steps=2)
    assert "grad_guard report" not in capsys.readouterr().out
    assert os.path.exists(os.path.join(t.logger.log_dir, "grad_guard_report.json"))
    guard = GradGuard(clipping=None)
    _fit(tmp_path / "printed", [guard], steps=2)
    assert "grad_guard report" in capsys.readouterr().out
