"""A small ResNet (residual + BatchNorm) on the digits, watched by ``GradGuard``.

Trains a CIFAR-style ResNet on scikit-learn's 8x8 digits with Lightning, with
``GradGuard()`` attached: per-layer gradient norms in TensorBoard, anomaly detection,
ZClip clipping and a health report at the end. ``--plain`` trains the same network
without its shortcut connections, for comparison.

Run:   python examples/resnet_digits.py [--depth 20] [--steps 150] [--plain]
Then:  tensorboard --logdir grad_guard_demo/examples
Needs: pip install "grad-guard[demo]"   (scikit-learn ships the digits data offline)
"""

from __future__ import annotations

import argparse

import lightning.pytorch as pl
import torch

from grad_guard import GradGuard
from grad_guard.data import digits_dataset, make_loader
from grad_guard.models import ImageClassifier, ResNet


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--depth", type=int, default=20, help="6n+2: 8, 14, 20, 32, ...")
    parser.add_argument("--width", type=int, default=16, help="channels of the first stage")
    parser.add_argument("--steps", type=int, default=150)
    parser.add_argument("--lr", type=float, default=0.1)
    parser.add_argument("--plain", action="store_true", help="no shortcut connections")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out-dir", default="grad_guard_demo/examples")
    args = parser.parse_args()

    pl.seed_everything(args.seed)
    dataset = digits_dataset(flatten=False)  # (1797, 1, 8, 8) images
    model = ResNet(
        in_channels=1, num_classes=10, depth=args.depth, width=args.width,
        residual=not args.plain,
    )  # fmt: skip
    module = ImageClassifier(model, lr=args.lr, momentum=0.9, weight_decay=1e-4)
    name = f"{'plain' if args.plain else 'resnet'}{args.depth}"
    trainer = pl.Trainer(
        max_steps=args.steps,
        accelerator="cpu",
        logger=pl.loggers.TensorBoardLogger(args.out_dir, name=name),
        callbacks=[GradGuard()],  # <- monitoring, detection, clipping, report
        log_every_n_steps=5,
        enable_checkpointing=False,
    )
    trainer.fit(module, make_loader(dataset, batch_size=64, seed=args.seed, drop_last=True))

    model.eval()
    with torch.no_grad():
        x, y = dataset.tensors
        accuracy = (model(x).argmax(1) == y).float().mean().item()
    print(f"{name}: training accuracy {accuracy:.1%} after {args.steps} steps")
    print(f"TensorBoard: tensorboard --logdir {args.out_dir}")


if __name__ == "__main__":
    main()
