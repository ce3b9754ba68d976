"""Rewards of the RL objective (``objective.rewards``): built-ins and user functions, weighted.

A reward is called once per prompt on its ``G`` decoded completions and returns ``G`` floats.
The reward of a completion is the weighted sum of every configured reward's value; each
reward's mean and std are logged on their own (``reward/<title>``).

Built-ins (``name:``):

* ``exact_match``: 1 when the completion equals the example's ``answer`` (whitespace runs
  collapsed, ends stripped), else 0;
* ``regex``: 1 when the stripped completion matches ``pattern`` as a whole (`re.fullmatch`),
  else 0 (a format reward);
* ``length``: DAPO's soft overlong penalty (Yu et al. 2025, eq. 13) on the completion's tokens
  ``n``: 0 up to ``max_tokens - buffer``, then falling linearly to -1 at ``max_tokens``, -1
  beyond (``max_tokens`` defaults to the objective's ``max_new_tokens``; ``buffer`` 0: a step
  at the limit).

User rewards (``function: module:function``): any importable function (the current directory
is searched first, as ``python -m`` does) called as ``fn(completions, example)`` with the
completions (``list[str]``) and the example (the JSON row of the prompt: ``prompt``,
``answer`` and any other field), plus ``completion_ids=`` (the token ids of each completion)
when it has a parameter of that name. It returns one float per completion. A function that
raises, returns another number of values or a non-finite value stops the run with a
`RewardError` naming it and the example.

Example:
  >>> rewards = build_rewards([RewardConfig(name="exact_match"),
  ...                          RewardConfig(name="regex", pattern=r"\\d+( \\d+)*", weight=0.5)],
  ...                         max_new_tokens=4)
  >>> [r.title for r in rewards]
  ['exact_match', 'regex']
  >>> score(rewards, ["1 9", "19", "a"], {"answer": "1 9"}, [[4, 5], [6], [7]],
  ...       where="example 0").tolist()
  [[1.0, 0.0, 0.0], [1.0, 1.0, 0.0]]
"""

from __future__ import annotations

import dataclasses
import importlib
import inspect
import math
import os
import re
import sys
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

from jlora.train.sections import ConfigError

__all__ = ["BUILTINS", "Reward", "RewardConfig", "RewardError", "build_rewards", "score"]


class RewardError(ValueError):
    """A reward function raised, or returned something other than one finite float per
    completion (the message names the function and the example)."""


@dataclasses.dataclass(frozen=True, kw_only=True)
class RewardConfig:
    """One entry of ``objective.rewards`` (module docstring).

    Attributes:
      name: a built-in reward: ``exact_match``, ``regex`` or ``length``.
      function: a user reward, ``"module:function"`` (give ``name`` or ``function``).
      weight: its weight in the summed reward.
      pattern: ``regex``: the pattern the whole stripped completion must match.
      max_tokens: ``length``: the completion tokens the penalty reaches -1 at (default: the
        objective's ``max_new_tokens``).
      buffer: ``length``: the tokens before ``max_tokens`` over which it ramps from 0 to -1.
    """

    name: str | None = None
    function: str | None = None
    weight: float = 1.0
    pattern: str | None = None
    max_tokens: int | None = None
    buffer: int = 0

    def __post_init__(self) -> None:
        if (self.name is None) == (self.function is None):
            raise ConfigError(
                "objective.rewards: each entry needs a built-in 'name' "
                f"({', '.join(BUILTINS)}) or a 'function' ('module:function'), not both"
            )
        if self.name is not None and self.name not in BUILTINS:
            raise ConfigError(
                f"objective.rewards: unknown reward name {self.name!r}; built-ins: "
                f"{', '.join(BUILTINS)} (or give function: 'module:function')"
            )
        if not math.isfinite(self.weight):
            raise ConfigError(f"objective.rewards: weight must be finite, got {self.weight}")
        if self.name == "regex":
            if not self.pattern:
                raise ConfigError("objective.rewards: the regex reward needs a 'pattern'")
            try:
                re.compile(self.pattern)
            except re.error as e:
                raise ConfigError(
                    f"objective.rewards: pattern {self.pattern!r} is not a regular expression ({e})"
                ) from e
        elif self.pattern is not None:
            raise ConfigError("objective.rewards: 'pattern' is an option of the regex reward")
        if self.name != "length" and (self.max_tokens is not None or self.buffer):
            raise ConfigError(
                "objective.rewards: 'max_tokens' and 'buffer' are options of the length reward"
            )
        if self.max_tokens is not None and self.max_tokens < 1:
            raise ConfigError(f"objective.rewards: max_tokens must be >= 1, got {self.max_tokens}")
        if self.buffer < 0:
            raise ConfigError(f"objective.rewards: buffer must be >= 0, got {self.buffer}")


def _normalized(text: str) -> str:
    return " ".join(str(text).split())


def exact_match(completions: Sequence[str], example: dict) -> list[float]:
    """1.0 where a completion equals ``example["answer"]`` (whitespace-normalized), else 0.0.

    Example:
      >>> exact_match([" 1  9", "1 8"], {"answer": "1 9"})
      [1.0, 0.0]
    """
    if "answer" not in example:
        raise KeyError("the example has no 'answer'")
    answer = _normalized(example["answer"])
    return [float(_normalized(c) == answer) for c in completions]


def _regex(pattern: str) -> Callable:
    compiled = re.compile(pattern)

    def regex(completions: Sequence[str], example: dict) -> list[float]:
        return [float(compiled.fullmatch(c.strip()) is not None) for c in completions]

    return regex


def _length(max_tokens: int, buffer: int) -> Callable:
    def length(completions: Sequence[str], example: dict, *, completion_ids) -> list[float]:
        out = []
        for ids in completion_ids:
            n = len(ids)
            if n > max_tokens:
                out.append(-1.0)
            elif n > max_tokens - buffer:  # inside the buffer (buffer > 0 here)
                out.append((max_tokens - buffer - n) / buffer)
            else:
                out.append(0.0)
        return out

    return length


#: The built-in rewards by name (module docstring).
BUILTINS = ("exact_match", "regex", "length")


@dataclasses.dataclass(frozen=True)
class Reward:
    """A configured reward: its ``title`` (in metrics and messages), the function, its weight,
    where it was configured (``objective.rewards[i]``) and whether it takes token ids."""

    title: str
    fn: Callable[..., Any]
    weight: float
    key: str
    wants_ids: bool


def _import(path: str, key: str) -> Callable:
    module, sep, attr = path.partition(":")
    if not sep or not module or not attr:
        raise ConfigError(f"{key}.function: expected 'module:function', got {path!r}")
    added = os.getcwd() not in sys.path
    if added:
        sys.path.insert(0, os.getcwd())
    try:
        mod = importlib.import_module(module)
    except ImportError as e:
        raise ConfigError(f"{key}.function {path!r}: cannot import {module!r} ({e})") from e
    finally:
        if added:
            sys.path.remove(os.getcwd())
    fn = mod
    for part in attr.split("."):
        if not hasattr(fn, part):
            raise ConfigError(f"{key}.function {path!r}: {module!r} has no attribute {attr!r}")
        fn = getattr(fn, part)
    if not callable(fn):
        raise ConfigError(f"{key}.function {path!r}: not callable ({type(fn).__name__})")
    return fn


def _takes_ids(fn: Callable) -> bool:
    try:
        params = inspect.signature(fn).parameters
    except (TypeError, ValueError):
        return False
    return "completion_ids" in params


def build_rewards(configs: Sequence[RewardConfig], *, max_new_tokens: int) -> list[Reward]:
    """The rewards of ``objective.rewards`` (user functions imported now).

    Raises:
      ConfigError: no reward, or a user function that cannot be imported (naming the key).
    """
    if not configs:
        raise ConfigError("objective.rewards: give at least one reward")
    out, seen = [], {}
    for i, c in enumerate(configs):
        key = f"objective.rewards[{i}]"
        if c.function is not None:
            fn, title = _import(c.function, key), c.function
        elif c.name == "exact_match":
            fn, title = exact_match, c.name
        elif c.name == "regex":
            fn, title = _regex(c.pattern or ""), c.name
        else:
            limit = c.max_tokens or max_new_tokens
            if c.buffer > limit:
                raise ConfigError(f"{key}: buffer {c.buffer} exceeds max_tokens {limit}")
            fn, title = _length(limit, c.buffer), str(c.name)
        seen[title] = seen.get(title, 0) + 1
        if seen[title] > 1:  # two regex rewards: regex, regex_2
            title = f"{title}_{seen[title]}"
        out.append(Reward(title, fn, c.weight, key, _takes_ids(fn)))
    return out


def _call(r: Reward, completions: list[str], example: dict, ids: list[list[int]], where: str):
    label = f"{r.key} ({r.title})"
    try:
        kw = {"completion_ids": ids} if r.wants_ids else {}
        got = r.fn(list(completions), dict(example), **kw)
    except Exception as e:  # any failure of user code stops the run, named
        raise RewardError(f"reward {label} raised {type(e).__name__}: {e} on {where}") from e
    try:
        values = np.asarray(got, dtype=np.float64)
    except (TypeError, ValueError):
        values = None
    if values is None or values.shape != (len(completions),):
        what = f"shape {values.shape}" if values is not None else f"a {type(got).__name__}"
        raise RewardError(
            f"reward {label} returned {what} for {len(completions)} completions on {where}: "
            "expected one float per completion"
        )
    bad = np.flatnonzero(~np.isfinite(values))
    if bad.size:
        raise RewardError(
            f"reward {label} returned {values[bad[0]]} for completion {bad[0]} on {where}: "
            "rewards must be finite"
        )
    return values


def score(
    rewards: Sequence[Reward],
    completions: Sequence[str],
    example: dict,
    completion_ids: Sequence[Sequence[int]],
    *,
    where: str,
) -> np.ndarray:
    """``(len(rewards), G)`` float64: each reward's values for the ``G`` completions of one
    example (unweighted). ``where`` names the example in errors.

    Raises:
      RewardError: a reward raised, or did not return ``G`` finite floats.
    """
    ids = [list(map(int, x)) for x in completion_ids]
    return np.stack([_call(r, list(completions), example, ids, where) for r in rewards])
