"""Fewer train programs: plan the sizes of a run's train batches, padding where it is cheaper.

Every distinct batch shape is its own XLA program: compiled before the step that first has it
(seconds on a CPU for a small BERT, minutes for a large model on an accelerator), while padding
a batch to a bigger size costs a little more compute in every step that has it. The batches
of a run are known before it starts (a pure function of the seed and the step), so the sizes
along the axis that varies (the rows of packed batches, the padded length of plain ones) can be
planned for the whole run: `plan_sizes` picks at most ``most`` sizes that cover every step with
the least padding in total, and `planned` pads a step's size up to the smallest planned size
that holds it. ``data.train_shapes`` sets ``most`` (`jlora.train.objectives.Objective.train_sizes`
gives the per-step sizes).

Example:
  >>> sizes = [10, 11, 11, 12, 12, 12, 13, 14]
  >>> plan_sizes(sizes, 1), plan_sizes(sizes, 2), plan_sizes(sizes, 9)
  ((14,), (12, 14), (10, 11, 12, 13, 14))
  >>> planned(11, (12, 14)), planned(13, (12, 14)), planned(15, (12, 14))
  (12, 14, 15)
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable

__all__ = ["padded_units", "plan_sizes", "planned"]


def plan_sizes(sizes: Iterable[int], most: int) -> tuple[int, ...]:
    """At most ``most`` sizes, the largest of ``sizes`` among them, minimizing `padded_units`.

    Exact, by dynamic programming over the distinct sizes (a handful in practice).

    Raises:
      ValueError: ``most`` < 1 or no sizes.
    """
    if most < 1:
        raise ValueError(f"data.train_shapes must be >= 1, got {most}")
    count = Counter(int(s) for s in sizes)
    if not count:
        raise ValueError("plan_sizes: no sizes to plan")
    values = sorted(count)
    n = len(values)
    if most >= n:
        return tuple(values)
    # cost(i, j): the steps with sizes values[i..j] all padded up to values[j]
    prefix_n = [0]
    for v in values:
        prefix_n.append(prefix_n[-1] + count[v])

    def cost(i: int, j: int) -> int:
        return values[j] * (prefix_n[j + 1] - prefix_n[i])

    inf = float("inf")
    # best[k][j]: least total for values[0..j] covered by k sizes, the largest being values[j]
    best = [[inf] * n for _ in range(most + 1)]
    back = [[-1] * n for _ in range(most + 1)]
    for j in range(n):
        best[1][j] = cost(0, j)
    for k in range(2, most + 1):
        for j in range(n):
            for i in range(j):  # the previous planned size is values[i]
                c = best[k - 1][i] + cost(i + 1, j)
                if c < best[k][j]:
                    best[k][j], back[k][j] = c, i
    k = min(range(1, most + 1), key=lambda k: (best[k][n - 1], k))
    chosen, j = [], n - 1
    while j >= 0 and k >= 1:
        chosen.append(values[j])
        j, k = back[k][j], k - 1
    return tuple(sorted(chosen))


def planned(size: int, plan: tuple[int, ...] | None) -> int:
    """The smallest planned size that holds ``size`` (``size`` itself when none does)."""
    return min((s for s in plan or () if s >= size), default=size)


def padded_units(sizes: Iterable[int], plan: tuple[int, ...] | None) -> int:
    """The sum of the steps' sizes once each is padded to its `planned` size.

    Example:
      >>> padded_units([10, 11, 14], (14,)), padded_units([10, 11, 14], None)
      (42, 35)
    """
    return sum(planned(int(s), plan) for s in sizes)
