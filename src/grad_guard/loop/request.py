"""The :class:`~grad_guard.core.step.StepRequest` of one ``GradientGuard.step`` call.

A hand-written loop has one model and at most one optimizer: the request watches the
optimizer's parameters (or the model's trainable ones), under key ``0`` with no label.
"""

from __future__ import annotations

from torch import Tensor, nn
from torch.optim import Optimizer

from grad_guard.core.layers import optimizer_layers, optimizer_parameters, parameters_signature
from grad_guard.core.rollback import RecoveryTargets
from grad_guard.core.step import StepRequest


def loop_request(
    model: nn.Module,
    optimizer: Optimizer | None,
    step: int,
    loss: Tensor | None,
    batch_index: int | None,
    logging: bool,
    fold_into_optimizer: bool,
) -> StepRequest:
    """What the engine needs to know about this step of a plain loop.

    Args:
        model: the (unwrapped) model; a rollback restores it.
        optimizer: its parameters are the ones watched, when given; a rollback restores
            it too.
        step: the step number, for logging and events.
        loss: the step's training loss, for the loss-spike rule (``None``: not judged).
        batch_index: the batch's index within its epoch, to skip a batch that caused a
            rollback.
        logging: whether this step writes its metrics.
        fold_into_optimizer: let a fused ``optimizer`` clip and skip inside its kernel.

    Example:
        >>> request = loop_request(nn.Linear(2, 1), None, 3, None, None, True, True)
        >>> request.step, len(request.params), request.layers("module")[0].name
        (3, 2, '(root)')
    """
    groups = optimizer.param_groups if optimizer is not None else None
    params = (
        optimizer_parameters(groups)
        if groups is not None
        else [p for p in model.parameters() if p.requires_grad]
    )
    return StepRequest(
        module=model,
        key=0,
        label="",
        layers=lambda granularity: optimizer_layers(model, groups, granularity),
        signature=parameters_signature(groups) if groups is not None else len(params),
        params=params,
        step=step,
        log_step=step,
        logging=logging,
        optimizer=optimizer if fold_into_optimizer else None,
        loss=loss.detach() if isinstance(loss, Tensor) else None,
        batch_index=batch_index,
        targets=lambda: RecoveryTargets(
            modules=[model], optimizers=[optimizer] if optimizer is not None else []
        ),
    )
