"""The pure-torch anomaly rules: no Lightning, synthetic gradients, fast."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from grad_guard.core.detect import (
    DetectionConfig,
    EMAZScore,
    GradientAnomalyDetector,
    RollingZScore,
    judged_for_vanishing,
    vanishing_layers,
)
from grad_guard.core.events import AnomalyEvent, GradientAnomalyError
from grad_guard.core.layers import group_parameters
from grad_guard.core.stats import GradientStatsComputer

from sync_counter import count_host_syncs


def _model() -> nn.Module:
    return nn.Sequential(
        nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 32), nn.ReLU(), nn.Linear(32, 4)
    )


class _Synthetic:
    """A model whose gradients we write by hand: a fixed direction times noise."""

    def __init__(self, seed: int = 0, **config: float) -> None:
        torch.manual_seed(seed)
        self.model = _model()
        self.layers = group_parameters(self.model)
        self.computer = GradientStatsComputer(self.layers)
        self.detector = GradientAnomalyDetector(
            self.computer.layer_names,
            DetectionConfig(**config),
            judged_for_vanishing(self.layers),
        )
        self.generator = torch.Generator().manual_seed(seed)
        self.base = [
            torch.randn(p.shape, generator=self.generator) for p in self.model.parameters()
        ]

    def set_grads(self, scale: float = 1.0, layer_scale: dict[int, float] | None = None) -> None:
        """Gradient = base + 30% noise, times a per-step factor (1 +- ~15%)."""
        factor = 1.0 + 0.15 * torch.randn((), generator=self.generator).clamp(-3, 3).item()
        for index, (param, base) in enumerate(zip(self.model.parameters(), self.base)):
            noise = torch.randn(param.shape, generator=self.generator)
            layer = index // 2  # weight, bias of each Linear
            extra = (layer_scale or {}).get(layer, 1.0)
            param.grad = (base + 0.3 * noise) * factor * scale * extra

    def step(self, step: int, **kwargs) -> list[AnomalyEvent]:
        return self.detector.check(self.computer(), step=step, **kwargs)


@pytest.mark.parametrize("seed", range(5))
def test_ordinary_noise_over_200_steps_is_not_exploding(seed):
    run = _Synthetic(seed)
    kinds = []
    for step in range(200):
        # a slowly decaying norm, as in real training, plus per-step noise
        run.set_grads(scale=2.0 * 0.995**step)
        kinds += [event.kind for event in run.step(step)]
    assert kinds == []


def test_100x_spike_after_warmup_is_exploding_and_names_the_layer():
    run = _Synthetic()
    events = []
    for step in range(200):
        spike = {1: 100.0} if step == 150 else None  # layer "2" (second Linear)
        run.set_grads(layer_scale=spike)
        events += run.step(step)
    assert [(e.kind, e.step, e.rule) for e in events] == [("exploding", 150, "spike")]
    (event,) = events
    assert event.layers == ("2",)
    assert event.total_norm > event.threshold
    assert event.values[0] == pytest.approx(event.total_norm, rel=0.05)  # it dominates


def test_whole_gradient_spike_is_flagged_and_does_not_poison_the_window():
    run = _Synthetic()
    flagged = []
    for step in range(200):
        run.set_grads(scale=100.0 if step in (120, 123) else 1.0)
        flagged += [e.step for e in run.step(step) if e.kind == "exploding"]
    # the second spike, 3 steps later, is caught too: the first entered the window clipped
    assert flagged == [120, 123]


def test_spike_before_warmup_is_not_flagged():
    run = _Synthetic(spike_warmup_steps=64)
    flagged = []
    for step in range(70):
        run.set_grads(scale=100.0 if step == 30 else 1.0)
        flagged += [e.step for e in run.step(step)]
    assert flagged == []


def test_lasting_change_of_scale_is_absorbed():
    run = _Synthetic(spike_window=32, spike_warmup_steps=16)
    flagged = []
    for step in range(200):
        run.set_grads(scale=3.0 if step >= 60 else 1.0)
        flagged += [e.step for e in run.step(step) if e.kind == "exploding"]
    assert flagged and flagged[0] == 60
    assert max(flagged) < 60 + 32  # within about one window


def test_absolute_limit_names_largest_layer_before_warmup():
    run = _Synthetic(max_total_norm=50.0, spike_z_threshold=None)
    run.set_grads(layer_scale={2: 1000.0})
    (event,) = run.step(0)
    assert (event.kind, event.rule, event.layers) == ("exploding", "max_total_norm", ("4",))
    assert event.threshold == 50.0


def test_nonfinite_names_layers_and_origin_closest_to_loss():
    run = _Synthetic()
    run.set_grads()
    run.model[0].weight.grad[0, 0] = math.nan
    run.model[2].bias.grad[1] = math.inf
    (event,) = run.step(5)
    assert event.kind == "nonfinite" and event.step == 5
    assert event.layers == ("0", "2")
    assert event.origin == "2"
    assert math.isnan(event.values[0]) and math.isinf(event.values[1])
    # a NaN step enters no statistics: the next finite step is judged normally
    run.set_grads()
    assert run.step(6) == []


def test_amp_overflow_is_counted_not_reported():
    run = _Synthetic()
    run.set_grads()
    run.model[4].weight.grad.fill_(math.inf)
    run.detector.update(run.computer(), step=0, amp_overflow=torch.tensor(True))
    findings = run.detector.read()
    assert findings.amp_overflows == 1 and findings.amp_now
    assert findings.nonfinite.count == 0 and findings.exploding.count == 0


def test_vanishing_rule_stateless():
    norms = torch.tensor([1e-12, 1e-3, 1.0, 0.0])
    judged = torch.tensor([True, True, True, False])
    below, threshold, by_ratio = vanishing_layers(norms, judged, None, 1e-5)
    assert below.tolist() == [True, False, False, False]
    assert threshold.item() == pytest.approx(1e-5) and by_ratio.item()
    below, threshold, by_ratio = vanishing_layers(norms, judged, 0.01, 1e-5)
    assert below.tolist() == [True, True, False, False] and not by_ratio.item()


def test_vanishing_needs_patience_and_clears():
    run = _Synthetic(vanishing_patience=3)
    steps = []
    for step in range(8):
        tiny = 1e-9 if step < 5 else 1.0
        run.set_grads(layer_scale={0: tiny})
        steps += [(e.step, e.layers) for e in run.step(step) if e.kind == "vanishing"]
    # below the limit on steps 0..4: reported from the third consecutive step on
    assert steps == [(2, ("0",)), (3, ("0",)), (4, ("0",))]
    assert run.detector.read().vanishing.count == 0


def test_layers_without_gradient_and_lone_biases_are_not_vanishing():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 4), nn.BatchNorm1d(4), nn.Linear(4, 4), nn.Linear(4, 2))
    layers = group_parameters(model, "parameter")
    assert judged_for_vanishing(layers) == [True, False, False, False, True, False, True, False]
    computer = GradientStatsComputer(layers)
    detector = GradientAnomalyDetector(
        computer.layer_names, DetectionConfig(vanishing_patience=1), judged_for_vanishing(layers)
    )
    model(torch.randn(8, 4)).square().sum().backward()
    # a bias before BatchNorm gets (almost) no gradient by construction
    assert model[0].bias.grad.norm() < 1e-5 * model[3].weight.grad.norm()
    model[2].weight.grad = None  # no gradient this step (e.g. an unused branch)
    model[2].bias.grad = None
    assert detector.check(computer(), step=0) == []
    model[0].weight.grad.mul_(1e-12)  # a real weight matrix that gets nothing is flagged
    (event,) = detector.check(computer(), step=1)
    assert event.kind == "vanishing" and event.layers == ("0.weight",)


def test_update_makes_no_host_sync():
    run = _Synthetic(max_total_norm=1e3, vanishing_min_norm=1e-9)
    with count_host_syncs(lambda: 0) as calls:
        for step in range(80):  # past warm-up: every branch of the rules runs
            run.set_grads()
            run.detector.update(run.computer(), step=step, amp_overflow=torch.tensor(False))
    assert sum(calls.values()) == 0
    assert run.detector.read().updates == 80  # the read itself is the one transfer


def test_lazy_read_covers_the_interval_with_first_step():
    run = _Synthetic()
    for step in range(10):
        run.set_grads()
        if step in (3, 7):
            run.model[2].weight.grad[0, 0] = math.nan
        run.detector.update(run.computer(), step=100 + step)
    findings = run.detector.read()
    assert findings.nonfinite.count == 2 and findings.nonfinite.first_step == 103
    assert not findings.nonfinite.now and findings.nonfinite.active == ()
    event = findings.nonfinite.event("warn")
    assert event.occurrences == 2 and event.layers == ("2",)


def test_packs_of_two_ranks_combine_with_max():
    """What the all-reduce does: a NaN seen by one rank is seen by all."""
    a, b = _Synthetic(), _Synthetic()
    a.set_grads()
    b.set_grads()
    b.model[4].weight.grad[0, 0] = math.nan
    a.detector.update(a.computer(), step=0)
    b.detector.update(b.computer(), step=0)
    combined = torch.maximum(a.detector.pack(), b.detector.pack())
    findings = a.detector.read(reduce=lambda packed: combined)
    assert findings.nonfinite.now and findings.nonfinite.layers == ("4",)


def test_state_dict_round_trip_keeps_statistics():
    first = _Synthetic()
    for step in range(100):
        first.set_grads()
        first.detector.update(first.computer(), step=step)
    first.detector.read()
    state = first.detector.state_dict()
    second = GradientAnomalyDetector(first.computer.layer_names, first.detector.config)
    second.load_state_dict(state)
    first.set_grads(scale=100.0)
    stats = first.computer()
    assert [e.kind for e in second.check(stats, step=100)] == ["exploding"]
    # the spike entered the window too (clipped to the threshold)
    assert second.state_dict()["total"]["count"].item() == 101
    fresh = GradientAnomalyDetector(first.computer.layer_names, first.detector.config)
    assert fresh.check(stats, step=100) == []  # without the history it cannot tell


def test_rolling_and_ema_scores_agree_on_a_plain_series():
    torch.manual_seed(0)
    rolling = RollingZScore(window=64, z_threshold=6.0, warmup_steps=32)
    ema = EMAZScore(1, window=64, z_threshold=6.0, warmup_steps=32)
    ok = torch.tensor(True)
    for _ in range(100):
        value = 1.0 + 0.1 * torch.randn(())
        spike, _ = rolling.step(value, ok)
        spiked, _, _ = ema.step(value.reshape(1), ok.reshape(1))
        assert not spike.item() and not spiked.item()
    mean, std = rolling.mean_std()
    assert mean.item() == pytest.approx(1.0, abs=0.05) and std.item() == pytest.approx(0.1, rel=0.3)
    assert rolling.step(torch.tensor(5.0), ok)[0].item()
    assert ema.step(torch.tensor([5.0]), ok.reshape(1))[0].item()


def test_event_serialisation_and_error():
    event = AnomalyEvent(
        4, "vanishing", ("fc01", "fc02"), (1e-17, 2e-16), 3e-6, "raise", rule="min_ratio"
    )
    assert AnomalyEvent.from_dict(event.to_dict()) == event
    error = GradientAnomalyError(event)
    assert error.event is event and "'fc01'" in str(error) and "3e-06" in str(error)
    import pickle

    assert pickle.loads(pickle.dumps(error)).event == event


@pytest.mark.parametrize(
    ("kwargs", "argument"),
    [
        ({"max_total_norm": 0.0}, "max_total_norm"),
        ({"max_total_norm": "big"}, "max_total_norm"),
        ({"spike_z_threshold": -1.0}, "spike_z_threshold"),
        ({"spike_window": 1}, "spike_window"),
        ({"spike_window": 2.5}, "spike_window"),
        ({"spike_warmup_steps": 1}, "spike_warmup_steps"),
        ({"spike_warmup_steps": 200}, "spike_warmup_steps"),
        ({"vanishing_min_norm": -1e-3}, "vanishing_min_norm"),
        ({"vanishing_min_ratio": 1.0}, "vanishing_min_ratio"),
        ({"vanishing_min_ratio": float("nan")}, "vanishing_min_ratio"),
        ({"vanishing_patience": 0}, "vanishing_patience"),
        ({"vanishing_patience": True}, "vanishing_patience"),
    ],
)
def test_invalid_config_names_the_argument(kwargs, argument):
    with pytest.raises(ValueError, match=f"`{argument}`"):
        DetectionConfig(**kwargs)


def test_detector_rejects_mismatched_layers():
    with pytest.raises(ValueError, match="vanishing_judged"):
        GradientAnomalyDetector(["a", "b"], vanishing_judged=[True])
    run = _Synthetic()
    run.set_grads()
    other = GradientAnomalyDetector(["only"])
    with pytest.raises(ValueError, match="layers"):
        other.update(run.computer())
