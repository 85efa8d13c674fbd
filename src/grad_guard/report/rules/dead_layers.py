"""Dead layers: a gradient of exactly zero (dead ReLUs) or none at all (frozen, detached)."""

from __future__ import annotations

from grad_guard.report.findings import Finding
from grad_guard.report.rules.base import Evidence, names


def dead_layers(ev: Evidence) -> list[Finding]:
    """Find layers whose recent records all had a zero or missing gradient."""
    info = ev.info
    dead = [r for r in ev.rows if "dead" in r.flags]
    if not dead:
        return []
    findings = []
    no_grad = [r for r in dead if r.no_grad >= r.zero]
    zero = [r for r in dead if r.no_grad < r.zero]
    streaks = {r.name: ev.history.aggregates[r.name].dead_streak for r in dead}
    if zero:
        evidence = [
            f"{len(zero)} layer(s) had a gradient norm of exactly 0 for the last "
            f"{min(streaks[r.name] for r in zero)}+ logged steps: {names([r.name for r in zero])}"
        ]
        advice = [
            "dead ReLUs: if every unit feeding the layer is inactive, no gradient flows; a too-large "
            "step can push biases negative for good. Lower the learning rate, use LeakyReLU/GELU, "
            "and He init",
            "check the layer is not multiplied by zero downstream (masking, a "
            "zero-initialised next layer)",
        ]
        if info is not None and info.relu_family:
            evidence.append(f"the model uses {', '.join(info.relu_family)}")
        findings.append(
            Finding(
                "dead_layers",
                "warning",
                "Dead layers: zero gradient",
                evidence,
                advice,
                [r.name for r in zero],
            )
        )
    if no_grad:
        evidence = [
            f"{len(no_grad)} layer(s) got no gradient at all (grad is None) for the last "
            f"{min(streaks[r.name] for r in no_grad)}+ logged steps: {names([r.name for r in no_grad])}"
        ]
        advice = [
            "frozen by mistake? check the layer is used in forward and not cut off by .detach(), "
            "torch.no_grad() or an unused branch; if it is frozen on purpose, set "
            "requires_grad=False so the optimizer and grad_guard skip it"
        ]
        findings.append(
            Finding(
                "dead_layers",
                "warning",
                "Layers without gradient",
                evidence,
                advice,
                [r.name for r in no_grad],
            )
        )
    return findings
