"""Situations real training runs produce that must not corrupt grad_guard's numbers."""

import pytest
import torch
from torch import nn

from grad_guard import (
    AutoClip,
    GradGuard,
    GradientAnomalyDetection,
    GradientClipping,
    GradientNormMonitor,
    NormClip,
)

from helpers import TinyModule, make_loader, read_scalars, trainer


class SometimesNoLoss(TinyModule):
    """Returns ``None`` from ``training_step`` every other batch (Lightning then steps with no grads)."""

    def training_step(self, batch, batch_idx):
        if batch_idx % 2:
            return None
        return super().training_step(batch, batch_idx)


def test_steps_without_gradients_do_not_enter_clipping_or_detection_statistics(tmp_path):
    clipping = GradientClipping(AutoClip(percentile=10.0))
    detection = GradientAnomalyDetection()
    t = trainer(tmp_path, max_steps=12, callbacks=[detection, clipping])
    t.fit(SometimesNoLoss(), make_loader(n=256))
    algorithm = clipping.algorithms[0]
    assert algorithm.steps == 6  # only the steps that had gradients
    history = algorithm.history[torch.isfinite(algorithm.history)]
    assert history.numel() == 6 and bool((history > 0).all())
    assert detection.counts["exploding"] == 0


class UnfreezeAtStep(TinyModule):
    def __init__(self) -> None:
        super().__init__()
        self.net[0].requires_grad_(False)

    def on_train_batch_start(self, batch, batch_idx):
        if self.trainer.global_step == 3:
            self.net[0].requires_grad_(True)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


def test_layers_unfrozen_during_training_are_measured(tmp_path):
    t = trainer(tmp_path, max_steps=6, callbacks=[GradGuard(clipping=None, report=False)])
    t.fit(UnfreezeAtStep(), make_loader())
    logged = read_scalars(t.logger.log_dir)["grad_norm/net.0"]
    assert sorted(logged) == [3, 4, 5]


def test_monitor_with_another_granularity_still_logs_pre_clip_norms(tmp_path):
    guard = GradGuard(
        monitor=GradientNormMonitor(granularity="parameter"), clipping=NormClip(1e-3), report=False
    )
    t = trainer(tmp_path, max_steps=3, callbacks=[guard])
    t.fit(TinyModule(), make_loader())
    logs = read_scalars(t.logger.log_dir)
    for step in range(3):
        pre = logs["grad_guard/clip/pre_norm"][step]
        assert pre > 1e-2
        assert logs["grad_guard/total_grad_norm"][step] == pytest.approx(pre, rel=1e-5)


def test_loading_a_checkpoint_forgets_statistics_gathered_since(tmp_path):
    clipping = GradientClipping(AutoClip())
    saved = clipping.state_dict()  # as an LR finder does before its search
    t = trainer(tmp_path, max_steps=4, callbacks=[clipping])
    t.fit(TinyModule(), make_loader())
    assert clipping.algorithms[0].steps == 4
    clipping.load_state_dict(saved)
    assert clipping.algorithms == {}
    assert clipping.algorithm.steps == 0


class SparseEmbedding(TinyModule):
    def __init__(self) -> None:
        super().__init__()
        self.embedding = nn.Embedding(10, 4, sparse=True)

    def training_step(self, batch, batch_idx):
        x, y = batch
        x = x + self.embedding(torch.zeros(len(x), dtype=torch.long))
        return nn.functional.cross_entropy(self(x), y)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


def test_sparse_gradients_with_histograms_do_not_stop_training(tmp_path):
    t = trainer(tmp_path, max_steps=2, callbacks=[GradientNormMonitor(histogram_every_n_steps=1)])
    t.fit(SparseEmbedding(), make_loader())
    assert t.global_step == 2
    assert "grad_norm/net.0" in read_scalars(t.logger.log_dir)


@pytest.mark.parametrize(
    ("cls", "kwargs", "argument"),
    [
        (GradGuard, {"report": "false"}, "report"),
        (GradGuard, {"print_report": 0}, "print_report"),
        (GradGuard, {"log_every_n_steps": -5}, "log_every_n_steps"),
        (GradientNormMonitor, {"log_update_ratio": "no"}, "log_update_ratio"),
    ],
)
def test_non_bool_flags_are_rejected(cls, kwargs, argument):
    with pytest.raises(ValueError, match=f"`{argument}`"):
        cls(**kwargs)
