"""QDyLoRA rank schedules: which prefixes of a rank-``R`` adapter a training step computes its loss at.

Each step trains the adapter at one or more *active ranks* ``b`` (the first ``b``
components, at the trained rank's scale ``alpha / R``), with a weight per rank
that sums to 1:

* ``uniform``: one rank, uniform on 1..R (DyLoRA and QDyLoRA as published).
* ``pair``: two ranks, a sampled one with P(b) proportional to 1/b and R itself,
  half the loss each.  Small prefixes are sampled more often, as they need
  (uniform sampling leaves a rank-1 prefix 10% above a rank-1 run), and every
  step keeps the whole adapter trained towards the full-rank optimum.
* ``nested``: every power of two up to R, and R (the Matryoshka loss), rank 1
  and R at twice the weight of the ranks between: every prefix users evaluate
  is trained every step, at that many forward and backward passes per step (as
  many in all as one fixed-rank run per rank).  The ends weigh more because
  each has one side only: the first component serves every rank, the last
  ones rank R alone (equal weights left both ends 2-3% above fixed-rank runs).
* ``sampled``: ``nested`` at three passes a step: rank 1 and R every step at
  their nested weight, and one of the ranks between drawn uniformly, carrying
  the weight all of them have in ``nested``; its expected loss is the nested
  loss, so it trains towards the same adapter at 3/5 of the passes (rank 16).

``docs/qdylora.md`` measures each against fixed-rank runs.
"""

from __future__ import annotations

import torch

SCHEDULES = ("uniform", "pair", "nested", "sampled")
END_WEIGHT = 2.0  # nested: the loss weight of rank 1 and of R against the ranks between


def step_ranks(schedule: str, rank_max: int, generator: torch.Generator) -> list[tuple[int, float]]:
    """``[(active rank, loss weight)]`` for one step; draws from ``generator`` (one draw for uniform and pair)."""
    if schedule == "uniform":
        return [(int(torch.randint(1, rank_max + 1, (1,), generator=generator)), 1.0)]
    if schedule == "pair":
        inverse = 1.0 / torch.arange(1, rank_max + 1, dtype=torch.float64)
        rank = int(torch.multinomial(inverse, 1, generator=generator)) + 1
        return [(rank, 0.5), (rank_max, 0.5)] if rank < rank_max else [(rank_max, 1.0)]
    if schedule in ("nested", "sampled"):
        nested = _nested(rank_max)
        if schedule == "nested" or len(nested) <= 3:
            return nested
        between = nested[1:-1]
        drawn = between[int(torch.randint(0, len(between), (1,), generator=generator))][0]
        return [nested[0], (drawn, sum(w for _, w in between)), nested[-1]]
    raise ValueError(f"unknown rank schedule {schedule!r}; allowed: {', '.join(SCHEDULES)}")


def _nested(rank_max: int) -> list[tuple[int, float]]:
    """The nested schedule's ``[(rank, weight)]``: every power of two up to ``rank_max`` and ``rank_max``."""
    ranks = sorted({1 << i for i in range(rank_max.bit_length()) if 1 << i <= rank_max} | {rank_max})
    weights = [END_WEIGHT if rank in (1, rank_max) else 1.0 for rank in ranks]
    return [(rank, w / sum(weights)) for rank, w in zip(ranks, weights)]
