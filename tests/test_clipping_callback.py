"""``GradientClipping`` in real ``Trainer.fit`` runs."""

from __future__ import annotations

import math
import os
import re
from typing import Any

import lightning as L
import pytest
import torch
from lightning.pytorch.plugins import MixedPrecision
from torch import nn

from grad_guard import GradientNormMonitor
from grad_guard.callbacks.clipping import AdaptiveGradientClipping, GradientClipping
from grad_guard.core.clip import AGC, AutoClip, NormClip, ValueClip, ZClip

from helpers import TinyModule, event_dirs, make_loader, read_scalars, trainer
from sync_counter import count_host_syncs

CLIP_TAGS = (
    "grad_guard/clip/pre_norm",
    "grad_guard/clip/post_norm",
    "grad_guard/clip/threshold",
    "grad_guard/clip/clipped_fraction",
)


def scalars_of(tmp_path: Any) -> dict[str, dict[int, float]]:
    (log_dir,) = event_dirs(str(tmp_path))
    return read_scalars(log_dir)


class Recorder(L.Callback):
    """Runs after the clipper: keeps the clipped grad norm."""

    def __init__(self) -> None:
        self.post_norms: list[float] = []

    def on_before_optimizer_step(self, trainer: Any, pl_module: Any, optimizer: Any) -> None:
        grads = [p.grad for p in pl_module.parameters() if p.grad is not None]
        self.post_norms.append(torch.nn.utils.get_total_norm(grads).item())


# -- construction -------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("shortcut", "kind"),
    [
        ("norm", NormClip),
        ("value", ValueClip),
        ("autoclip", AutoClip),
        ("zscore", ZClip),
        ("agc", AGC),
    ],
)
def test_string_shortcuts(shortcut, kind):
    assert type(GradientClipping(shortcut).algorithm) is kind
    assert type(GradientClipping().algorithm) is ZClip


@pytest.mark.parametrize(
    ("kwargs", "argument"),
    [
        ({"algorithm": "zclip"}, "algorithm"),
        ({"algorithm": 3}, "algorithm"),
        ({"algorithm": torch.nn.utils.clip_grad_norm_}, "algorithm"),
        ({"log_every_n_steps": 0}, "log_every_n_steps"),
    ],
)
def test_invalid_arguments(kwargs, argument):
    with pytest.raises(ValueError, match=f"`{argument}`"):
        GradientClipping(**kwargs)


def test_built_from_a_lightning_cli_config():
    from jsonargparse import ArgumentParser
    from lightning.pytorch import Callback

    parser = ArgumentParser()
    parser.add_argument("--callbacks", type=list[Callback])
    config = parser.parse_string(
        """
        callbacks:
          - class_path: grad_guard.GradientClipping
            init_args:
              algorithm:
                class_path: grad_guard.core.clip.AutoClip
                init_args: {percentile: 25.0, window: 50}
              log_every_n_steps: 5
          - class_path: grad_guard.GradientClipping
            init_args: {algorithm: agc}
        """
    )
    first, second = parser.instantiate(config).callbacks
    assert isinstance(first.algorithm, AutoClip) and first.algorithm.window == 50
    assert first.algorithm.percentile == 25.0 and first.log_every_n_steps == 5
    assert isinstance(second.algorithm, AGC)


# -- one fit ------------------------------------------------------------------------------


def test_logs_clipping_scalars_and_shares_the_pass(tmp_path):
    clipper = GradientClipping(NormClip(0.05), log_every_n_steps=2)
    monitor = GradientNormMonitor(log_every_n_steps=2, log_update_ratio=False)
    recorder = Recorder()
    t = trainer(tmp_path, max_steps=6, callbacks=[clipper, monitor, recorder])
    t.fit(TinyModule(), make_loader())
    scalars = scalars_of(tmp_path)
    for name in CLIP_TAGS:
        assert sorted(scalars[name]) == [0, 2, 4], name
    assert t.grad_guard_session.engine.passes == 6  # one statistics pass per step, for both
    for step in (0, 2, 4):
        pre, post = (
            scalars["grad_guard/clip/pre_norm"][step],
            scalars["grad_guard/clip/post_norm"][step],
        )
        # the monitor sees the raw gradients, the optimizer the clipped ones
        assert scalars["grad_guard/total_grad_norm"][step] == pytest.approx(pre, rel=1e-6)
        assert pre > 0.05 and post == pytest.approx(0.05, rel=1e-4)
        assert recorder.post_norms[step] == pytest.approx(post, rel=1e-4)
        assert scalars["grad_guard/clip/threshold"][step] == pytest.approx(0.05)
        assert scalars["grad_guard/clip/clipped_fraction"][step] == 1.0
    last = clipper.algorithm.last
    assert last.post_norm.item() == pytest.approx(recorder.post_norms[-1], rel=1e-4)
    assert last.threshold.item() == pytest.approx(0.05)
    assert clipper.clipped_fraction == 1.0 and clipper.steps == 6
    for regexes in clipper.layout_charts().values():
        assert any(re.search(r, name) for r in regexes for name in CLIP_TAGS)


def test_clipped_fraction_is_per_logging_interval(tmp_path):
    class OneBigStep(TinyModule):
        def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
            loss = super().training_step(batch, batch_idx)
            return loss * (1000.0 if self.global_step == 5 else 1.0)

    clipper = GradientClipping(NormClip(10.0), log_every_n_steps=4)
    t = trainer(tmp_path, max_steps=9, callbacks=[clipper])
    t.fit(OneBigStep(), make_loader())
    fraction = scalars_of(tmp_path)["grad_guard/clip/clipped_fraction"]
    assert fraction == {0: 0.0, 4: 0.0, 8: 0.25}  # step 5 alone, among steps 5-8
    assert clipper.clipped_fraction == pytest.approx(1 / 9)
    assert clipper.algorithm.clipped_steps.item() == 1


def test_warns_once_about_double_clipping(tmp_path):
    clipper = GradientClipping("autoclip")
    t = trainer(tmp_path, max_steps=2, callbacks=[clipper], gradient_clip_val=1.0)
    with pytest.warns(UserWarning, match="both clip"):
        t.fit(TinyModule(), make_loader())
    t = trainer(tmp_path, max_steps=2, callbacks=[clipper], gradient_clip_val=1.0)
    with pytest.warns() as record:
        t.fit(TinyModule(), make_loader())
    assert not [w for w in record if "both clip" in str(w.message)]


def test_agc_knows_the_lightning_module(tmp_path):
    clipper = GradientClipping(AGC(clip_factor=1e-3))
    module = TinyModule()
    trainer(tmp_path, max_steps=2, callbacks=[clipper]).fit(module, make_loader())
    units = clipper.algorithm.units(list(module.parameters()))
    assert [u.excluded for u in units] == [False, False, False, False, True, True]
    assert clipper.algorithm.clipped_steps.item() == 2


def test_16_mixed_clips_unscaled_gradients(tmp_path):
    pre_norms = {}
    for precision in ("32", "16-mixed"):
        kwargs: dict[str, Any] = {}
        if precision == "16-mixed":  # on CPU Lightning makes no GradScaler by itself
            scaler = torch.amp.GradScaler("cpu", init_scale=2.0**12)
            kwargs["plugins"] = [MixedPrecision("16-mixed", "cpu", scaler=scaler)]
        clipper = GradientClipping(ZClip(warmup_steps=2), log_every_n_steps=1)
        torch.manual_seed(0)
        t = trainer(tmp_path / precision, max_steps=4, callbacks=[clipper], **kwargs)
        t.fit(TinyModule(), make_loader())
        pre_norms[precision] = scalars_of(tmp_path / precision)["grad_guard/clip/pre_norm"]
        assert math.isfinite(clipper.algorithm.mean.item())
    for step, value in pre_norms["32"].items():
        assert pre_norms["16-mixed"][step] == pytest.approx(value, rel=2e-2)  # not x 4096


# -- several optimizers -------------------------------------------------------------------


class TwoOptimizers(L.LightningModule):
    """Manual optimization: ``gen`` and ``disc`` stepped by their own optimizer."""

    def __init__(self) -> None:
        super().__init__()
        self.automatic_optimization = False
        self.gen = nn.Linear(4, 4)
        self.disc = nn.Linear(4, 2)
        self.norms: dict[int, list[float]] = {0: [], 1: []}

    def _step(self, index: int, optimizer: Any, loss: torch.Tensor, params: Any) -> None:
        optimizer.zero_grad()
        self.manual_backward(loss)
        self.norms[index].append(torch.nn.utils.get_total_norm([p.grad for p in params]).item())
        optimizer.step()

    def training_step(self, batch: Any, batch_idx: int) -> None:
        x, y = batch
        gen_opt, disc_opt = self.optimizers()
        self._step(0, gen_opt, self.disc(self.gen(x)).pow(2).mean() * 50, self.gen.parameters())
        loss = nn.functional.cross_entropy(self.disc(x), y)
        self._step(1, disc_opt, loss, self.disc.parameters())

    def configure_optimizers(self) -> Any:
        return (
            torch.optim.SGD(self.gen.parameters(), lr=0.01),
            torch.optim.SGD(self.disc.parameters(), lr=0.01),
        )


def test_state_per_optimizer_in_manual_optimization(tmp_path):
    clipper = GradientClipping(AutoClip(window=10), log_every_n_steps=2)
    module = TwoOptimizers()
    t = trainer(tmp_path, max_steps=8, callbacks=[clipper])
    t.fit(module, make_loader())
    algorithms = clipper.algorithms
    assert sorted(algorithms) == [0, 1] and algorithms[0] is clipper.algorithm
    for index in (0, 1):
        history = algorithms[index].history
        expected = torch.tensor(module.norms[index])
        assert algorithms[index].steps == len(expected) == 4
        torch.testing.assert_close(history[:4], expected, rtol=1e-5, atol=0)
    scalars = scalars_of(tmp_path)
    for index in (0, 1):
        pre = scalars[f"grad_guard/optimizer_{index}/clip/pre_norm"]
        assert sorted(pre) == [0, 2]
        assert pre[2] == pytest.approx(module.norms[index][2], rel=1e-5)
    state = clipper.state_dict()["algorithms"]
    assert sorted(state) == [0, 1]
    assert not torch.equal(state[0]["history"][:4], state[1]["history"][:4])


# -- checkpoints --------------------------------------------------------------------------


def test_one_clipper_per_trainer_and_its_state_is_saved(tmp_path):
    first = GradientClipping(ZClip(warmup_steps=2))
    second = GradientClipping(AutoClip(window=7))
    with pytest.warns(DeprecationWarning, match="now `GradientClipping`"):
        alias = AdaptiveGradientClipping("norm")
    assert first.state_key == second.state_key == alias.state_key
    assert isinstance(alias, GradientClipping)
    with pytest.raises(RuntimeError, match="more than one stateful callback"):
        trainer(tmp_path, max_steps=3, callbacks=[first, second])
    t = trainer(tmp_path, max_steps=3, callbacks=[first])
    t.fit(TinyModule(), make_loader())
    path = os.path.join(str(tmp_path), "last.ckpt")
    t.save_checkpoint(path)
    states = torch.load(path, weights_only=False)["callbacks"]
    assert states[first.state_key]["algorithms"][0]["count"].item() == 3


class NoRestore(GradientClipping):
    """Forgets its checkpointed state (the negative control of the resume test)."""

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        pass


def _fit_epochs(root: Any, make: Any, epochs: int, ckpt: str | None = None, cls: Any = None):
    torch.manual_seed(0)
    module = TinyModule(lr=0.2)
    clipper = (cls or GradientClipping)(make(), log_every_n_steps=5)
    t = trainer(root, max_steps=-1, max_epochs=epochs, callbacks=[clipper])
    t.fit(module, make_loader(n=80, batch_size=8), ckpt_path=ckpt)  # 10 batches an epoch
    return t, module, clipper


@pytest.mark.filterwarnings("ignore:Be aware that when using `ckpt_path`")
@pytest.mark.parametrize(
    "make",
    [
        lambda: ZClip(warmup_steps=5, z_threshold=1.0),
        lambda: AutoClip(percentile=50.0, window=8),
    ],
    ids=["zclip", "autoclip"],
)
def test_resume_is_exact(tmp_path, make):
    _, straight, straight_clipper = _fit_epochs(tmp_path / "straight", make, 4)

    first, _, half_clipper = _fit_epochs(tmp_path / "first", make, 2)
    clipped_at_cut = half_clipper.algorithm.clipped_steps.item()
    path = os.path.join(str(tmp_path), "half.ckpt")
    first.save_checkpoint(path)
    second, resumed, resumed_clipper = _fit_epochs(tmp_path / "second", make, 4, path)

    assert second.global_step == 40
    assert resumed_clipper.algorithm.clipped_steps.item() > clipped_at_cut > 0
    for a, b in zip(straight.parameters(), resumed.parameters()):
        torch.testing.assert_close(b, a, rtol=0, atol=1e-6)
    state_a = straight_clipper.algorithm.state_dict()
    state_b = resumed_clipper.algorithm.state_dict()
    for key in state_a:
        torch.testing.assert_close(state_b[key], state_a[key], rtol=0, atol=1e-6, equal_nan=True)

    # without the restored statistics the run ends elsewhere
    _, forgetful, _ = _fit_epochs(tmp_path / "forgetful", make, 4, path, cls=NoRestore)
    difference = max(
        (a - b).abs().max().item() for a, b in zip(straight.parameters(), forgetful.parameters())
    )
    assert difference > 1e-4


# -- host syncs ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    "make",
    [
        lambda: NormClip(0.1),
        lambda: NormClip(0.1, per_parameter=True),
        lambda: ValueClip(0.01),
        lambda: AutoClip(),
        lambda: ZClip(warmup_steps=3),
        lambda: AGC(),
    ],
    ids=["norm", "norm-per-parameter", "value", "autoclip", "zclip", "agc"],
)
def test_no_host_sync_between_logging_steps(tmp_path, make):
    clipper = GradientClipping(make())
    t = trainer(tmp_path, max_steps=25, log_every_n_steps=10, callbacks=[clipper])
    with count_host_syncs(lambda: t.fit_loop.epoch_loop._batches_that_stepped) as counts:
        t.fit(TinyModule(), make_loader(n=256))
    assert clipper.steps == 25
    assert counts[0] > 0 and counts[10] > 0 and counts[20] > 0  # the counter does see syncs
    assert {step for step in counts if step % 10} == set()
