import io
import json
import math

import lightning as L
import pytest
import torch
from lightning.pytorch.loggers import TensorBoardLogger
from torch import nn

from grad_guard.callbacks.monitor import GradientNormMonitor
from grad_guard.data import digits_loader, make_loader, synthetic_dataset
from grad_guard.history import GradientHistory
from grad_guard.models import DeepMLP, ImageClassifier, ResidualMLP, ResNet
from grad_guard.report import (
    JSON_NAME,
    MARKDOWN_NAME,
    build_report,
    inspect_model,
    report_for_trainer,
)

pytestmark = pytest.mark.filterwarnings("ignore:grad_guard. the Trainer has no logger")


def _loader():
    try:
        return digits_loader(batch_size=64, drop_last=True)
    except ImportError:  # no scikit-learn: same shapes, generated with torch
        return make_loader(synthetic_dataset(), batch_size=64, drop_last=True)


def _fit(model: nn.Module, steps: int, lr: float, tmp_path=None, momentum: float = 0.0):
    """Train ``model`` on digits with a monitor logging every step; returns (trainer, module, monitor)."""
    torch.manual_seed(0)
    module = ImageClassifier(model, lr=lr, momentum=momentum)
    monitor = GradientNormMonitor(log_every_n_steps=1, image_every_n_steps=None)
    logger = TensorBoardLogger(str(tmp_path)) if tmp_path is not None else False
    trainer = L.Trainer(
        accelerator="cpu",
        max_steps=steps,
        logger=logger,
        log_every_n_steps=1,
        enable_progress_bar=False,
        enable_model_summary=False,
        enable_checkpointing=False,
    )
    trainer.callbacks.append(monitor)
    trainer.fit(module, _loader())
    return trainer, module, monitor


def test_sigmoid_mlp_gets_activation_and_init_advice(tmp_path):
    torch.manual_seed(0)
    model = DeepMLP(64, 10, depth=20, width=32, activation="sigmoid", init="default")
    trainer, module, monitor = _fit(model, steps=12, lr=0.1, tmp_path=tmp_path)
    out = io.StringIO()
    report = report_for_trainer(trainer, module, monitor.history, print_report=False)
    report.print(file=out, use_rich=False)

    assert "vanishing_activation" in report.rules()
    finding = report.findings[report.rules().index("vanishing_activation")]
    advice = " ".join(finding.advice)
    assert "ReLU" in advice and "He" in advice and "Sigmoid" in advice
    evidence = " ".join(finding.evidence)
    assert "model.fc01" in evidence and "model.head" in evidence  # cites the layers
    assert "19 saturating" in evidence
    first = report.layers[0]
    assert first.name == "model.fc01" and first.median < 1e-6 * report.layers[-1].median
    assert "vanishing" in first.flags
    # plain stack: the depth rule points to the reference residual models
    assert "vanishing_depth" in report.rules()
    assert "ResidualMLP" in " ".join(
        report.findings[report.rules().index("vanishing_depth")].advice
    )
    assert not report.healthy
    # written next to the TensorBoard logs, with the pictures
    log_dir = trainer.logger.log_dir
    with open(f"{log_dir}/{JSON_NAME}") as handle:
        data = json.load(handle)
    assert data["healthy"] is False
    assert [f["rule"] for f in data["findings"]] == report.rules()
    assert len(data["layers"]) == 20 and data["model"]["residual"] is False
    with open(f"{log_dir}/{MARKDOWN_NAME}") as handle:
        markdown = handle.read()
    assert "## Diagnosis" in markdown and "model.fc01" in markdown
    text = out.getvalue()
    assert "median" in text and "model.fc01" in text and "try:" in text


def test_healthy_residual_bn_model_gets_no_false_alarm():
    torch.manual_seed(0)
    model = ResidualMLP(64, 10, depth=20, width=32)
    _, module, monitor = _fit(model, steps=30, lr=0.1, momentum=0.9)
    report = build_report(monitor.history, model=module, precision="32-true")
    assert report.findings == [], report.render_text()
    assert report.healthy
    assert report.model.residual and report.model.norm_layers
    assert all(row.median is not None and row.update_ratio is not None for row in report.layers)


def test_exploding_run_gets_learning_rate_and_clipping_advice():
    torch.manual_seed(0)
    model = DeepMLP(64, 10, depth=20, width=32, activation="relu", init="he")
    _, module, monitor = _fit(model, steps=12, lr=1.0)
    report = build_report(monitor.history, model=module, precision="32-true")
    assert "exploding" in report.rules(), report.render_text()
    finding = report.findings[report.rules().index("exploding")]
    advice = " ".join(finding.advice)
    assert "learning rate" in advice and "GradientClipping(" in advice
    assert "grew from" in " ".join(finding.evidence)
    assert finding.severity == "critical"
    # the run ends in NaN: full-precision advice, not the fp16 one
    assert "nonfinite" in report.rules()
    assert "bf16" not in " ".join(report.findings[report.rules().index("nonfinite")].advice)


# ---------------------------------------------------------------- synthetic histories


def test_spikes_recommend_zclip_and_drift_recommends_autoclip():
    layers = ["fc1", "fc2"]
    spiky = GradientHistory()
    for step in range(40):
        total = 50.0 if step in (20, 33) else 1.0 + 0.01 * step
        spiky.record(step, layers, [total / 2, total / 2], total_norm=total)
    report = build_report(spiky)
    finding = report.findings[report.rules().index("exploding")]
    assert "ZClip" in " ".join(finding.advice)
    assert "2 spike(s)" in finding.evidence[0]

    drifting = GradientHistory()
    for step in range(40):
        total = 1.1**step
        drifting.record(step, layers, [total / 2, total / 2], total_norm=total)
    finding = build_report(drifting).findings[0]
    assert finding.rule == "exploding" and "AutoClip" in " ".join(finding.advice)
    assert "drifted" in " ".join(finding.evidence)

    clipped = GradientHistory()
    for step in range(40):
        clipped.record(step, layers, [0.5, 0.5], total_norm=1.0)
    finding = build_report(clipped, clipped_fraction=0.9).findings[0]
    assert finding.title == "Frequent clipping" and "90%" in finding.evidence[0]
    assert build_report(clipped, clipped_fraction=0.1).findings == []


def test_nonfinite_under_fp16_suggests_bf16_or_loss_scaling():
    history = GradientHistory()
    for step in range(10):
        history.record(step, ["fc1", "fc2"], [1.0, math.inf if step == 6 else 1.0], total_norm=1.0)
    fp16 = build_report(history, precision="16-mixed", counts={"nonfinite": 1, "amp_overflow": 1})
    finding = fp16.findings[fp16.rules().index("nonfinite_amp")]
    assert "bf16-mixed" in finding.advice[0] and finding.layers == ["fc2"]
    assert "step 6" in finding.evidence[0]
    fp32 = build_report(history, precision="32-true")
    assert "set_detect_anomaly" in fp32.findings[fp32.rules().index("nonfinite")].advice[0]
    # rare overflows the GradScaler handled are only informational
    clean = GradientHistory()
    for step in range(100):
        clean.record(step, ["fc1"], [1.0], total_norm=1.0)
    rare = build_report(clean, precision="16-mixed", counts={"amp_overflow": 2})
    assert [f.severity for f in rare.findings] == ["info"] and rare.healthy


def test_dead_and_frozen_layers():
    history = GradientHistory()
    for step in range(12):
        history.record(step, ["fc1", "fc2", "fc3"], [1.0, 0.0, 0.0], has_grad=[True, True, False])
    model = nn.Sequential(nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, 2))
    report = build_report(history, model=model)
    titles = {f.title: f for f in report.findings if f.rule == "dead_layers"}
    zero = titles["Dead layers: zero gradient"]
    assert zero.layers == ["fc2"] and "ReLU" in " ".join(zero.evidence + zero.advice)
    frozen = titles["Layers without gradient"]
    assert frozen.layers == ["fc3"] and "requires_grad=False" in frozen.advice[0]
    assert "dead" in report.layers[1].flags and "dead" not in report.layers[0].flags


def test_update_ratio_far_from_1e3():
    def history_with_ratio(ratio):
        history = GradientHistory()
        for step in range(10):
            history.record(step, ["fc1", "fc2"], [1.0, 1.0], total_norm=1.4)
            history.record_update_ratios(step, ["fc1", "fc2"], [ratio, ratio])
        return history

    assert build_report(history_with_ratio(1e-3)).findings == []
    high = build_report(history_with_ratio(0.2)).findings
    assert [f.rule for f in high] == ["update_ratio_high"] and "0.2" in high[0].evidence[0]
    low = build_report(history_with_ratio(1e-7)).findings
    assert [f.rule for f in low] == ["update_ratio_low"]


def test_inspect_model_reads_structure():
    sigmoid = inspect_model(DeepMLP(64, 10, depth=6, activation="sigmoid"))
    assert sigmoid.depth == 6 and sigmoid.saturating == ["Sigmoid"]
    assert not sigmoid.residual and sigmoid.init_guess() == "default"
    assert inspect_model(ResidualMLP(64, 10, depth=6)).residual
    assert inspect_model(ResNet(depth=8, width=4)).residual
    plain = inspect_model(ResNet(depth=8, width=4, residual=False))
    assert not plain.residual and plain.convolutional and plain.norm_layers
    he = nn.Linear(256, 256)
    nn.init.kaiming_normal_(he.weight, nonlinearity="relu")
    assert inspect_model(nn.Sequential(he)).init_guess() == "he"


def test_report_without_data_and_json_is_strict(tmp_path):
    history = GradientHistory()
    history.record(0, ["a"], [math.nan], total_norm=math.nan, has_grad=[True])
    report = build_report(history)
    paths = report.write(tmp_path)
    with open(paths["json"]) as handle:
        data = json.load(handle)  # strict JSON: no NaN literals
    assert data["layers"][0]["median"] is None
    assert build_report(GradientHistory()).findings == []
    rich_out = io.StringIO()
    report.print(file=rich_out)
    assert "a" in rich_out.getvalue() and "NaN/Inf" in rich_out.getvalue()


def test_one_json_safe_conversion_for_the_whole_report(tmp_path):
    from grad_guard.jsonsafe import from_json_number, json_safe, plain

    history = GradientHistory()
    history.record(0, ["a", "b"], [math.inf, 1.0], total_norm=math.inf)
    history.add_event({"step": 0, "kind": "nonfinite", "layers": ["a"], "values": [math.inf]})
    data = build_report(history).to_dict()
    json.dumps(data, allow_nan=False)  # strict JSON
    assert data["events"][0]["values"] == ["inf"]  # an overflow is not a missing value
    assert history.events[0]["values"] == [math.inf]  # in memory it stays a float
    assert json_safe([math.nan, -math.inf, torch.tensor([1.5])]) == [None, "-inf", [1.5]]
    assert plain((torch.tensor(2.0), math.nan))[0] == 2.0
    assert from_json_number("inf") == math.inf


def test_rule_registry_runs_an_added_rule_in_order():
    from grad_guard.report import Finding, rules

    def always(evidence):
        return [Finding("always", "info", "always fires", [f"{len(evidence.rows)} rows"], [])]

    history = GradientHistory()
    history.record(0, ["a"], [1.0])
    try:
        rules.register(always, before=rules.RULES[0])
        assert rules.RULES[0] is always
        assert build_report(history).rules() == ["always"]
    finally:
        rules.RULES.remove(always)
    assert build_report(history).rules() == []
    with pytest.raises(TypeError, match="rule"):
        rules.register("not a function")


def test_run_config_is_validated():
    from grad_guard.report import RunConfig

    config = RunConfig.from_json('{"version": 1, "clipping": null, "detection": null}')
    assert config.clip_algorithm is None and config.action("on_nonfinite") is None
    assert "no clipping" in config.describe()
    with pytest.raises(ValueError, match="not JSON"):
        RunConfig.from_json("{nope")
    with pytest.raises(ValueError, match=r"`clipping`.*got 'AutoClip'"):
        RunConfig.from_mapping({"clipping": "AutoClip"})
    with pytest.raises(ValueError, match="JSON object"):
        build_report(GradientHistory(), config=["AutoClip"])
