"""Deciding a class's verdict from some of its examples: an anytime-valid confidence sequence for
the number of robust examples among a class's finite set, sampled without replacement.

Waudby-Smith and Ramdas, "Confidence sequences for sampling without replacement" (NeurIPS 2020):
with a prior over the count K of robust examples among a class's C clean-correct ones, the ratio
prior(K) / posterior_n(K) under the hypergeometric model is a nonnegative martingale with mean 1
at the true K, so by Ville's inequality ``{K : prior(K) / posterior_n(K) < 1/alpha}`` covers the
true K at every n at once, with probability at least 1 - alpha. A scan may therefore look after
every round and stop a class as soon as the set lies on one side of its threshold.

The prior is beta-binomial(C, 1, 1), uniform over K: it favours no verdict, and measured against
a prior centred on the floor it needs about as many examples (benchmarks/RESULTS.md). Whatever
the prior, the set holds the K that makes the sample likeliest (the ratio there is at most 1),
so the point estimate reported lies inside the interval and judges as the interval does.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
from scipy.stats import betabinom, hypergeom

#: The beta-binomial prior's (a, b): uniform over the count of robust examples.
PRIOR = (1.0, 1.0)
#: Examples of each class attacked in the first round; each later round takes an undecided
#: class's count so far times GROWTH. Fewer, larger rounds keep working batches full for a few
#: more examples than a look after every 8 (measured in benchmarks/RESULTS.md).
ROUND = 8
GROWTH = 1.5
#: The gate's tolerance on ratios of counts (gate._TOL), so a count decides as the gate does.
_TOL = 1e-9

ABOVE, BELOW = "above", "below"


@dataclass(frozen=True)
class Decision:
    """Where a class stands: ``status`` is ABOVE, BELOW or None (undecided); ``low`` and
    ``high`` bound the count of robust examples among its ``population`` clean-correct ones."""

    status: str | None
    low: int
    high: int
    #: The count that makes the sample likeliest (always within [low, high]).
    estimate: int


def needed(floor: float, examples: int) -> int:
    """The fewest robust examples out of ``examples`` that reach ``floor`` as the gate judges
    it (robust accuracy >= floor, to the gate's tolerance)."""
    return max(0, math.ceil((floor - _TOL) * examples))


def confidence_sequence(robust: int, attacked: int, population: int, alpha: float,
                        prior: tuple[float, float] = PRIOR) -> tuple[int, int, int]:
    """The set of counts K (robust among ``population``) not yet excluded after ``robust`` of
    ``attacked`` drawn without replacement were robust, as (low, high, likeliest K)."""
    if not 0 <= robust <= attacked <= population:
        raise ValueError(f"need 0 <= robust <= attacked <= population, got {robust}, "
                         f"{attacked}, {population}")
    if attacked == population:
        return robust, robust, robust
    counts = np.arange(robust, robust + population - attacked + 1)
    a, b = prior
    log_prior = betabinom.logpmf(counts, population, a, b)
    # The posterior of the unseen robust examples is beta-binomial again (conjugacy).
    log_post = betabinom.logpmf(counts - robust, population - attacked, a + robust,
                                b + attacked - robust)
    kept = counts[log_prior - log_post < math.log(1 / alpha)]
    likeliest = int(counts[np.argmax(hypergeom.logpmf(robust, population, counts, attacked))])
    return int(kept.min()), int(kept.max()), likeliest


def decide(robust: int, attacked: int, population: int, need: int | None, alpha: float,
           prior: tuple[float, float] = PRIOR) -> Decision:
    """Whether the whole confidence sequence reaches ``need`` robust examples (ABOVE), or lies
    below it (BELOW); None while it straddles it or when there is no threshold."""
    low, high, estimate = confidence_sequence(robust, attacked, population, alpha, prior)
    status = None
    if need is not None and low >= need:
        status = ABOVE
    elif need is not None and high < need:
        status = BELOW
    return Decision(status, low, high, estimate)


def checkpoint(attacked: int, population: int) -> int:
    """How many of a class's ``population`` examples are attacked after its next round."""
    step = ROUND if attacked == 0 else max(attacked + 1, int(attacked * GROWTH))
    return min(population, step)


def round_order(indices: np.ndarray, seed: int) -> np.ndarray:
    """``indices`` in a seeded order that depends on nothing but each index and the seed (not
    on the batch size, the number of ranks or which other examples are there)."""
    indices = np.asarray(indices, dtype=np.uint64)
    # splitmix64's finaliser: a well-mixed hash of (seed, index), stable across platforms.
    with np.errstate(over="ignore"):
        z = indices + np.uint64(seed) * np.uint64(0x9E3779B97F4A7C15)
        z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        z = z ^ (z >> np.uint64(31))
    return indices[np.lexsort((indices, z))].astype(np.int64)
