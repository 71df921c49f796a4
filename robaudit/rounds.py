"""A sequential scan's rounds: which examples each round attacks, what each class's confidence
sequence decided, and the figures of a class decided from some of its examples.

The clean pass runs on every selected example; a clean-incorrect example is non-robust for free.
Each class's clean-correct examples are attacked in a seeded order, in rounds of growing size
(:func:`robaudit.sequential.checkpoint`); after each round every undecided class asks its
confidence sequence whether its count of robust examples lies on one side of the count its
threshold needs. Every class gets the first round, so every class has figures and the signs of
masking are looked for in all of them.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np

from robaudit.gate import GatePolicy
from robaudit.masking import Escalation
from robaudit.metrics import WORST, ClassStats, Rate, Records, Summary
from robaudit.recording import merge_columns
from robaudit.sequential import (
    GROWTH,
    ROUND,
    Decision,
    checkpoint,
    confidence_sequence,
    decide,
    needed,
    round_order,
)


@dataclass
class ClassRounds:
    """One class in a sequential scan."""

    name: str
    #: Its selected examples, and the clean-correct ones among them (what a full scan attacks).
    examples: int
    order: np.ndarray
    #: Robust examples it needs to pass (None: no threshold to decide against).
    need: int | None
    attacked: int = 0
    decision: Decision | None = None
    #: The round that decided it (0 for none yet).
    round: int = 0
    #: (examples attacked, low, high) of the robust count after each round.
    history: list[tuple[int, int, int]] = field(default_factory=list)

    @property
    def population(self) -> int:
        return len(self.order)

    @property
    def open(self) -> bool:
        """Still to attack: undecided, with examples left."""
        return self.round == 0 and self.attacked < self.population

    def to_dict(self) -> dict[str, Any]:
        d, n = self.decision, max(self.examples, 1)
        return {"attacked": self.attacked, "of": self.population, "round": self.round or None,
                "decided": None if d is None or self.round == 0 else d.status,
                "exhausted": self.attacked == self.population,
                "interval": None if d is None else [d.low / n, d.high / n],
                "history": [[a, lo / n, hi / n] for a, lo, hi in self.history]}


@dataclass
class Plan:
    """Every class's rounds; the same on every rank (built from the gathered records)."""

    classes: list[ClassRounds]
    alpha: float
    on: str
    #: Clean-incorrect examples: recorded in the first round, never attacked.
    unattacked: np.ndarray
    #: The deployed runtime's clean accuracy over every example (ONNX models), else None.
    runtime_clean_acc: float | None = None
    rounds: int = 0

    def next_round(self) -> np.ndarray:
        """The next round's examples (empty when every class is decided or has none left)."""
        chosen = [self.unattacked] if self.rounds == 0 else []
        chosen += [c.order[c.attacked:checkpoint(c.attacked, c.population)]
                   for c in self.classes if c.open]
        picked = np.concatenate(chosen) if chosen else np.zeros(0, dtype=np.int64)
        return np.sort(picked.astype(np.int64))

    def update(self, records: Records) -> None:
        """After a completed round (``records``: every round's so far), each open class's
        confidence sequence; a class it decides, or whose examples ran out, is closed."""
        self.rounds += 1
        y, robust = records.labels(), records.robust_under(None if self.on == WORST
                                                            else [self.on])
        for k, c in enumerate(self.classes):
            if c.round:
                continue
            c.attacked = checkpoint(c.attacked, c.population)
            count = int(robust[y == k].sum())
            c.decision = decide(count, c.attacked, c.population, c.need, self.alpha)
            c.history.append((c.attacked, c.decision.low, c.decision.high))
            if c.decision.status is not None or c.attacked == c.population:
                c.round = self.rounds

    def scale(self, stats: Sequence[ClassStats]) -> list[ClassStats]:
        """Each class's figures over all its examples: a class attacked in part gets the count
        that makes its sample likeliest, within its confidence sequence as its interval."""
        return [s if c.attacked >= c.population else _scaled(s, c, self.alpha)
                for s, c in zip(stats, self.classes, strict=True)]

    def summary(self, summary: Summary, stats: Sequence[ClassStats]) -> Summary:
        """Accuracies across classes over every selected example, from scaled ``stats``."""
        n = sum(s.n for s in stats)
        runtime = [s.runtime_robust for s in stats]
        return replace(summary, n=n, clean_acc=sum(s.clean.correct for s in stats) / n,
                       robust_acc={a: sum(s.robust[a].correct for s in stats) / n
                                   for a in summary.robust_acc},
                       runtime_clean_acc=self.runtime_clean_acc,
                       runtime_robust_acc=None if None in runtime else
                       sum(r.correct for r in runtime if r is not None) / n)

    def to_dict(self, confidence: float) -> dict[str, Any]:
        return {"confidence": confidence, "first_round": ROUND, "growth": GROWTH,
                "rounds": self.rounds,
                "attacked": sum(c.attacked for c in self.classes),
                "of": sum(c.population for c in self.classes),
                "classes": {c.name: c.to_dict() for c in self.classes}}


def _scaled(s: ClassStats, c: ClassRounds, alpha: float) -> ClassStats:
    def rate(r: Rate | None) -> Rate | None:
        if r is None:
            return None
        # (a runtime may call right a clean example torch got wrong: never more than attacked)
        robust = min(r.correct, c.attacked)
        low, high, likeliest = confidence_sequence(robust, c.attacked, c.population, alpha)
        return Rate(likeliest, c.examples, low / c.examples, high / c.examples)

    robust = {a: rate(r) for a, r in s.robust.items()}
    return replace(s, n=c.examples, clean=Rate.of(c.population, c.examples),
                   robust=robust, runtime_robust=rate(s.runtime_robust))  # type: ignore[arg-type]


def joined(was: Escalation, part: Escalation) -> Escalation:
    """What escalation did over the rounds so far (``was``) and one more (``part``)."""
    return replace(was, attacks=tuple(dict.fromkeys((*was.attacks, *part.attacks))),
                   examples=was.examples + part.examples, seconds=was.seconds + part.seconds,
                   explained=sorted({*was.explained, *part.explained}))


def plan(clean: Records, names: Sequence[str], policy: GatePolicy,
         baseline: Mapping[str, float] | None, confidence: float, seed: int) -> Plan:
    """The rounds of a scan whose clean pass gave ``clean``; ``baseline`` maps class names to
    the baseline's figure (with ``policy.max_drop``, a floor per class)."""
    y, correct = clean.labels(), clean.clean_correct()
    index = clean.array("index").astype(np.int64)
    classes = []
    for k, name in enumerate(names):
        floors = [policy.min_class_robust]
        if policy.max_drop is not None and baseline is not None and name in baseline:
            floors.append(baseline[name] - policy.max_drop)
        known = [f for f in floors if f is not None]
        examples = int((y == k).sum())
        classes.append(ClassRounds(name, examples, round_order(index[(y == k) & correct], seed),
                                   needed(max(known), examples) if known else None))
    runtime = clean.array("runtime_clean_pred")
    return Plan(classes, 1 - confidence, policy.on, np.sort(index[~correct]),
                float((runtime.astype(np.int64) == y).mean()) if len(runtime) else None)


def combine(parts: Sequence[Records], order: Sequence[str]) -> Records:
    """One set of records from the rounds': a column a round did not run (escalation found no
    sign there) carries that round's strongest result, as for the examples it did not attack."""
    total = Records(attack_names=[a for a in order if any(a in p.attack_names for p in parts)])
    for part in parts:
        if len(part) == 0:
            continue
        for name in total.attack_names:
            if name not in part.attack_names:
                merge_columns(part, Records(attack_names=[name]))
        total.extend(part)
    total.carried = [a for a in total.attack_names if any(a in p.carried for p in parts)]
    return total


def labelled(report: Callable[[Any], None], round_: int) -> Callable[[Any], None]:
    """``report`` with the round in each progress line (round 0: the clean pass), so that a CI
    log shows how far the rounds got."""
    if round_ == 0:
        return lambda p: report(replace(p, stage="clean pass"))
    return lambda p: report(replace(p, stage=f"{p.stage} (round {round_})"))


def drive(plan_: Plan, run_round: Callable[[np.ndarray], Records | None],
          order: Sequence[str]) -> Records:
    """Rounds until every class is decided or has no examples left; ``run_round`` attacks a
    round's examples and returns its gathered records (None when interrupted: an unfinished
    round decides nothing and is left out). Returns the completed rounds' records, combined
    with the columns in ``order``."""
    done: list[Records] = []
    while (chosen := plan_.next_round()).size:
        found = run_round(chosen)
        if found is None:
            break
        done.append(found)
        plan_.update(combine(done, order))
    return combine(done, order)
