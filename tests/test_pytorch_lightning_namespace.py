"""The same callbacks under ``lightning.pytorch`` and ``pytorch_lightning``."""

import json
import math
import os
import pickle
import subprocess
import sys
from typing import Any

import lightning as L
import pytest
import pytorch_lightning as pl
import torch
from torch import nn

import grad_guard
import grad_guard.pytorch_lightning as gg_pl

from helpers import make_loader, read_scalars

CALLBACK_NAMES = sorted(gg_pl.CALLBACKS)
OUR_PREFIXES = {"grad_norm", "param_norm", "grad_to_param", "update_ratio", "grad_guard"}


def _module_class(namespace: Any, poison_step: int) -> type:
    """The same small classifier for either namespace's ``LightningModule``."""

    class Tiny(namespace.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            self.net = nn.Sequential(
                nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 8), nn.Tanh(), nn.Linear(8, 2)
            )

        def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
            x, y = batch
            if batch_idx == poison_step:  # a NaN step, so detection has something to skip
                x = x * float("nan")
            return nn.functional.cross_entropy(self.net(x), y)

        def configure_optimizers(self) -> torch.optim.Optimizer:
            return torch.optim.SGD(self.parameters(), lr=0.5, momentum=0.9)

    return Tiny


def _callbacks(ns: Any, kind: str) -> list[Any]:
    """The same callbacks, built from ``ns`` (``grad_guard`` or its twin module)."""
    monitor = ns.GradientNormMonitor(log_every_n_steps=1, image_every_n_steps=None)
    if kind == "guard":
        return [
            ns.GradGuard(monitor=monitor, clipping=ns.ZClip(warmup_steps=2), log_every_n_steps=1)
        ]
    return [
        monitor,
        ns.GradientAnomalyDetection(on_nonfinite="skip", log_every_n_steps=1),
        ns.GradientClipping(ns.ZClip(warmup_steps=2), log_every_n_steps=1),
    ]


def _fit(namespace: Any, callbacks: list[Any], root: Any) -> tuple[dict, dict, str]:
    namespace.seed_everything(7, verbose=False)
    model = _module_class(namespace, poison_step=3)()
    trainer = namespace.Trainer(
        accelerator="cpu",
        devices=1,
        max_steps=8,
        log_every_n_steps=1,
        default_root_dir=str(root),
        enable_progress_bar=False,
        enable_model_summary=False,
        enable_checkpointing=False,
        callbacks=callbacks,
    )
    trainer.fit(model, make_loader(n=64, batch_size=8))
    weights = {k: v.detach().clone() for k, v in model.state_dict().items()}
    return read_scalars(trainer.logger.log_dir), weights, trainer.logger.log_dir


def test_twins_are_both_callbacks_and_share_the_implementation():
    for name in CALLBACK_NAMES:
        twin = getattr(gg_pl, name)
        original = getattr(grad_guard, name)
        assert issubclass(twin, pl.Callback) and issubclass(twin, L.pytorch.Callback)
        assert issubclass(twin, original)
        # nothing re-implemented: every attribute but the class bookkeeping is inherited
        assert set(vars(twin)) <= {"__module__", "__qualname__", "__doc__"}
        assert twin.__name__ == original.__name__
        assert getattr(gg_pl, name) is twin  # cached: one class per name
    # non-callback names are the very same objects
    assert gg_pl.GradientStats is grad_guard.GradientStats


def test_twin_pickles_by_reference_and_keeps_state_key():
    monitor = gg_pl.GradientNormMonitor(log_every_n_steps=3)
    copy = pickle.loads(pickle.dumps(monitor))
    assert type(copy) is gg_pl.GradientNormMonitor
    assert copy.state_key == grad_guard.GradientNormMonitor(log_every_n_steps=3).state_key


def test_unknown_name_raises_attribute_error():
    with pytest.raises(AttributeError, match="NoSuchCallback"):
        gg_pl.NoSuchCallback  # noqa: B018


def test_only_the_twin_is_a_pytorch_lightning_callback():
    # what pytorch_lightning checks (its LightningCLI, `Trainer(callbacks=one_callback)`)
    assert not isinstance(grad_guard.GradientNormMonitor(), pl.Callback)
    assert isinstance(gg_pl.GradientNormMonitor(), pl.Callback)


def test_importing_grad_guard_imports_neither_lightning_package():
    code = (
        "import sys, grad_guard; "
        "from grad_guard.core.stats import GradientStatsComputer; "
        "bad = [m for m in ('pytorch_lightning', 'lightning') if m in sys.modules]; "
        "assert not bad, bad"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)


@pytest.mark.parametrize("kind", ["guard", "separate"])
def test_both_trainers_log_the_same_values(tmp_path, kind):
    scalars_l, weights_l, dir_l = _fit(L, _callbacks(grad_guard, kind), tmp_path / "lightning")
    scalars_pl, weights_pl, dir_pl = _fit(pl, _callbacks(gg_pl, kind), tmp_path / "pl")

    def ours(scalars: dict) -> set[str]:
        return {t for t in scalars if t.split("/")[0] in OUR_PREFIXES}

    tags = ours(scalars_l)
    expected = {
        "grad_norm/net.0",
        "update_ratio/net.4",
        "grad_guard/total_grad_norm",
        "grad_guard/clip/post_norm",
        "grad_guard/anomalies/nonfinite",
        "grad_guard/skipped_steps",
    }
    assert expected <= tags
    assert tags == ours(scalars_pl)
    for tag in sorted(tags):
        assert scalars_l[tag].keys() == scalars_pl[tag].keys(), tag
        for step, value in scalars_l[tag].items():
            other = scalars_pl[tag][step]
            assert other == pytest.approx(value, rel=1e-6, abs=1e-12, nan_ok=True), (tag, step)
    # the NaN step was logged, then skipped, alike under both namespaces
    assert math.isnan(scalars_l["grad_guard/total_grad_norm"][3])
    assert scalars_l["grad_guard/skipped_steps"][7] == 1.0
    for key, value in weights_l.items():
        torch.testing.assert_close(weights_pl[key], value, rtol=0, atol=0)
    if kind == "guard":  # the end-of-fit report ran under both Trainers, with the same findings
        reports = [os.path.join(d, "grad_guard_report.json") for d in (dir_l, dir_pl)]
        contents = []
        for path in reports:
            with open(path) as f:
                contents.append(json.load(f))
        assert contents[0] == contents[1]
