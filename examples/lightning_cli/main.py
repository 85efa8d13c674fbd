"""grad_guard configured from YAML with LightningCLI.

Run (from this folder):
    python main.py fit --config config.yaml
    python main.py fit --config config.yaml --model.activation sigmoid --model.depth 12
    python main.py fit --help       # every option, grad_guard's callbacks included
Then: tensorboard --logdir lightning_logs
"""

from __future__ import annotations

from lightning.pytorch.cli import LightningCLI
from model import DeepClassifier, SyntheticData


def cli_main(args: list[str] | None = None, **kwargs: object) -> LightningCLI:
    """Build (and by default run) the CLI; ``args`` replaces ``sys.argv[1:]`` (tests)."""
    return LightningCLI(DeepClassifier, SyntheticData, args=args, **kwargs)


if __name__ == "__main__":
    cli_main()
