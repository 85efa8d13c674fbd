"""Train with grad_guard's callbacks configured by Hydra, as in lightning-hydra-template.

Run from anywhere (Hydra writes into ./outputs/<date>/<time>/)::

    python examples/hydra/train.py
    python examples/hydra/train.py callbacks=gradient_clipping trainer.max_epochs=5
    python examples/hydra/train.py model.activation=sigmoid model.depth=12 \\
        callbacks.grad_guard.detection.on_vanishing=stop
    tensorboard --logdir outputs

``configs/callbacks/grad_guard.yaml`` is the file to copy into a template project; the
rest (model, data, trainer, logger) mirrors the template's layout in miniature.
"""

from __future__ import annotations

from typing import Any

import hydra
import lightning as L
from hydra.utils import instantiate
from omegaconf import DictConfig


def instantiate_all(configs: DictConfig | None) -> list[Any]:
    """Build every entry of a config group that has a ``_target_`` (the template's helper).

    Args:
        configs: a mapping of name -> config, e.g. ``cfg.callbacks`` or ``cfg.logger``.

    Returns:
        The built objects, in the config's order; ``[]`` for ``None``.

    Raises:
        TypeError: if ``configs`` is not a mapping.
    """
    if not configs:
        return []
    if not isinstance(configs, DictConfig):
        raise TypeError(f"`configs` must be a DictConfig of name -> config, got {configs!r}")
    return [
        instantiate(config)
        for config in configs.values()
        if isinstance(config, DictConfig) and "_target_" in config
    ]


def fit(cfg: DictConfig) -> L.Trainer:
    """Build data, model, callbacks, loggers and Trainer from ``cfg`` and fit.

    Args:
        cfg: the composed ``train.yaml`` config.

    Returns:
        The Trainer after ``fit``.
    """
    L.seed_everything(cfg.seed, workers=True)
    datamodule = instantiate(cfg.data)
    model = instantiate(cfg.model)
    trainer = instantiate(
        cfg.trainer,
        callbacks=instantiate_all(cfg.get("callbacks")),
        logger=instantiate_all(cfg.get("logger")),
    )
    trainer.fit(model, datamodule=datamodule)
    return trainer


@hydra.main(version_base="1.3", config_path="configs", config_name="train")
def main(cfg: DictConfig) -> None:
    """The Hydra entry point."""
    fit(cfg)


if __name__ == "__main__":
    main()
