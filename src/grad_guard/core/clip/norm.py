"""``NormClip``: a fixed bound on the gradient norm, global (torch) or per tensor (Keras)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from torch import Tensor

from grad_guard._validation import check_bool, check_float
from grad_guard.core.clip.base import (
    ClipAlgorithm,
    ClipResult,
    norm_coefficient,
    scale_grads_,
    state_tensor,
)
from grad_guard.core.stats import total_from_layer_norms, validate_norm_type


class NormClip(ClipAlgorithm):
    r"""Scale the gradients down so that their norm is at most ``max_norm``.

    Two modes, named so that they are not confused:

    * ``per_parameter=False`` (default), the global norm of ``torch.nn.utils.clip_grad_norm_``
      and Lightning's ``gradient_clip_val``: the p-norm over *all* gradients, as if
      concatenated into one vector, is brought to ``max_norm`` by one common factor
      ``max_norm / (norm + 1e-6)``. The direction of the full update is kept.
    * ``per_parameter=True``, Keras' ``clipnorm``: each parameter tensor's gradient is
      scaled on its own so that *its* norm is at most ``max_norm``. Directions change
      between tensors; small tensors (biases) are rarely touched.

    A non-finite norm leaves the gradients as they are (``clip_grad_norm_`` would
    multiply them by NaN); drop such steps with ``GradientAnomalyDetection``.

    Args:
        max_norm: the bound, > 0.
        norm_type: p of the p-norm: ``2.0`` (default), ``1.0``, ``float("inf")``, ...
        per_parameter: ``True`` for the per-tensor (Keras ``clipnorm``) mode.

    Raises:
        ValueError: if ``max_norm`` is not a positive number (bools and strings are not
            numbers), ``norm_type`` is not a positive number or ``"inf"``, or
            ``per_parameter`` is not a bool.

    Example:
        >>> import torch
        >>> w = torch.nn.Parameter(torch.zeros(2))
        >>> w.grad = torch.tensor([3.0, 4.0])
        >>> clip = NormClip(max_norm=1.0)
        >>> clip([w])  # the norm before clipping, as clip_grad_norm_ returns it
        tensor(5.)
        >>> w.grad
        tensor([0.6000, 0.8000])
        >>> NormClip(max_norm=0)
        Traceback (most recent call last):
        ...
        ValueError: `max_norm` must be a number > 0, got 0
    """

    def __init__(
        self, max_norm: float, norm_type: float | str = 2.0, per_parameter: bool = False
    ) -> None:
        super().__init__()
        self.max_norm = check_float("max_norm", max_norm)
        self.norm_type = validate_norm_type(norm_type)
        self.per_parameter = check_bool("per_parameter", per_parameter)
        self.granularity = "parameter" if per_parameter else "module"

    def _clip(
        self,
        grads: list[Tensor],
        total_norm: Tensor,
        params: Sequence[Tensor] | None,
        tensor_norms: Tensor | None,
    ) -> ClipResult:
        threshold = state_tensor(self.max_norm, total_norm)
        if not self.per_parameter:
            coefficient, clipped = norm_coefficient(total_norm, threshold)
            self._scale_(grads, coefficient)
            post = total_norm * coefficient
            return ClipResult(total_norm, post, threshold, clipped)
        if tensor_norms is None:
            sources = grads if params is None else [p.grad for p in params]
            tensor_norms = self.tensor_norms(sources)  # type: ignore[arg-type]
        coefficients, clipped = norm_coefficient(tensor_norms, threshold.to(tensor_norms))
        scale_grads_(grads, coefficients.unbind(0))
        post = total_from_layer_norms(tensor_norms * coefficients, self.norm_type)
        return ClipResult(total_norm, post.to(total_norm), threshold, clipped.any())

    def _arguments(self) -> dict[str, Any]:
        return {
            "max_norm": self.max_norm,
            "norm_type": self.norm_type,
            "per_parameter": self.per_parameter,
        }
