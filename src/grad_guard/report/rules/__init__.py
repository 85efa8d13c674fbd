"""Diagnosis rules, one per file, and the registry that runs them in order.

Each rule is a function ``rule(evidence) -> list[Finding]``
(:data:`~grad_guard.report.rules.base.Rule`), registered in :data:`RULES`. Order
matters where one rule reads the flags another sets: the vanishing rules mark the
layers they name ``"vanishing"``, and the update-ratio rule stays quiet about a low
ratio that vanishing gradients already explain.

To add a rule: write ``report/rules/<name>.py`` with one function taking an
:class:`~grad_guard.report.rules.base.Evidence`, and add it to :data:`RULES` (or call
:func:`register` from your module).
"""

from __future__ import annotations

from grad_guard.report.findings import Finding
from grad_guard.report.rules.base import Evidence, Rule, Thresholds
from grad_guard.report.rules.dead_layers import dead_layers
from grad_guard.report.rules.exploding import exploding
from grad_guard.report.rules.nonfinite import nonfinite
from grad_guard.report.rules.update_ratio import update_ratio
from grad_guard.report.rules.vanishing import vanishing

RULES: list[Rule] = [vanishing, exploding, nonfinite, dead_layers, update_ratio]
"""The rules :func:`run_rules` applies, in this order."""


def register(rule: Rule, before: Rule | None = None) -> Rule:
    """Add ``rule`` to :data:`RULES` (at the end, or just before ``before``); returns it.

    Raises:
        TypeError: if ``rule`` is not callable.
    """
    if not callable(rule):
        raise TypeError(f"`rule` must be a function taking an Evidence, got {rule!r}")
    if rule in RULES:
        return rule
    RULES.insert(RULES.index(before) if before in RULES else len(RULES), rule)
    return rule


def _rules_for(evidence: Evidence) -> list[Rule]:
    rules = list(RULES)
    if evidence.activations is not None:
        # imported only when there are activation statistics: it needs torch
        from grad_guard.report.rules.activations import activations

        if activations not in rules:
            rules.append(activations)
    return rules


def run_rules(evidence: Evidence) -> list[Finding]:
    """Apply every rule of :data:`RULES` to ``evidence``; the findings, rule order.

    With activation statistics (``evidence.activations``) the activation rules of
    :mod:`grad_guard.report.rules.activations` run last.
    """
    findings: list[Finding] = []
    for rule in _rules_for(evidence):
        new = rule(evidence)
        for finding in new:
            if finding.rule.startswith("vanishing"):
                for name in finding.layers:
                    row = evidence.row(name)
                    if row is not None and "vanishing" not in row.flags:
                        row.flags.append("vanishing")
        findings += new
    return findings


__all__ = ["RULES", "Evidence", "Rule", "Thresholds", "register", "run_rules"]
