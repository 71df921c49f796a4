"""The scan's attacks from its settings: where each one runs (its stage), the settings it is
built with at one ε, and how the reports describe it."""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from robaudit.config import ScanConfig

if TYPE_CHECKING:
    from robaudit.attacks import AttackSettings


def attack_stage(config: ScanConfig, name: str) -> str:
    """Where attack ``name`` runs in a scan: ``scan``, ``finish`` or ``escalation``."""
    return ("scan" if name in config.attacks else "finish" if name in config.finish
            else "escalation")


def attack_settings(config: ScanConfig, eps: float, stage: str = "scan",
                    classes: int | None = None) -> AttackSettings:
    """The attacks' settings at one ε, in one stage, for a model of ``classes`` classes."""
    from robaudit.attacks import AttackSettings

    # An explicit step size is in pixel units at the gate's eps: scale it with a sweep's eps.
    step_size = None if config.step_size is None else config.step_size * eps / config.eps
    queries = config.escalation_queries if stage == "escalation" else config.queries
    return AttackSettings(eps=eps, steps=config.steps, step_size=step_size,
                          restarts=config.restarts, temperatures=config.temperatures,
                          schedule=config.schedule, norm=config.norm, queries=queries,
                          targets=config.targets, classes=classes)


def describe_attacks(config: ScanConfig, names: Sequence[str],
                     classes: int | None = None) -> list[dict[str, Any]]:
    """Each attack as it ran at the gate's ε (escalation's with its own query budget), and in
    which stage (``scan``, ``finish`` or ``escalation``): for the reports."""
    from robaudit.attacks import ATTACKS, build_attack

    described = []
    for name in names:
        stage = attack_stage(config, name)
        attack = build_attack(name, attack_settings(config, config.eps, stage, classes))
        entry: dict[str, Any] = {"name": name, "description": ATTACKS[name][1],
                                 "eps": config.eps, "norm": config.norm, "stage": stage,
                                 "escalation": stage == "escalation", **attack.describe()}
        described.append(entry)
    return described
