"""``optim.name``: any optax optimizer by name, with its keyword arguments (``optim.kwargs``).

`OPTIMIZERS` lists the optax functions whose first parameter is ``learning_rate`` and whose
update needs only the gradients (``adamw``, ``adafactor``, ``lion``, ``sgd``, ...).
``optim.lr`` and the schedule give the learning rate; ``optim.kwargs`` the rest, checked
against the function's signature when the config is read. ``adam`` / ``adamw`` also read
``optim.b1`` / ``b2`` / ``eps``, ``sgd`` ``optim.momentum``; ``optim.weight_decay`` is passed
to an optimizer that takes ``weight_decay`` and is otherwise added to the gradient before it
(`optax.add_decayed_weights`: L2).

Example:
    >>> "adafactor" in OPTIMIZERS and "lion" in OPTIMIZERS
    True
    >>> check("lion", {"b1": 0.95})
    >>> check("lion", {"beta1": 0.95})
    Traceback (most recent call last):
    ...
    ValueError: optim.kwargs.beta1 is not an argument of optax.lion; its arguments: b1, b2, mu_dtype, weight_decay, mask
"""

from __future__ import annotations

import inspect
from collections.abc import Mapping
from typing import Any

import optax

__all__ = ["OPTIMIZERS", "build", "check"]

# functions that take learning_rate first but are not a plain (grads -> updates) optimizer
_NOT_OPTIMIZERS = {"lbfgs", "scale_by_learning_rate", "scale_by_rprop"}
# the config's own keys for these (optim.b1 ...), refused in optim.kwargs
_FIELDS = {"adam": ("b1", "b2", "eps"), "adamw": ("b1", "b2", "eps"), "sgd": ("momentum",)}


def _optimizers() -> tuple[str, ...]:
    names = []
    for name in sorted(dir(optax)):
        fn = getattr(optax, name)
        if name.startswith("_") or name in _NOT_OPTIMIZERS or not inspect.isfunction(fn):
            continue
        params = list(inspect.signature(fn).parameters)
        if params and params[0] == "learning_rate":
            names.append(name)
    return tuple(names)


#: The ``optim.name`` values.
OPTIMIZERS = _optimizers()


def _arguments(name: str) -> list[str]:
    return [p for p in inspect.signature(getattr(optax, name)).parameters if p != "learning_rate"]


def check(name: str, kwargs: Mapping[str, Any] | None) -> None:
    """Refuse an unknown ``optim.name`` or an ``optim.kwargs`` key its optimizer does not take
    (a ValueError naming the key and the valid ones; the ``optim`` section raises it as a
    `ConfigError`); then build it once, so a value it refuses is an error now rather than at
    the first step."""
    if name not in OPTIMIZERS:
        raise ValueError(
            f"optim.name {name!r} is not an optax optimizer; valid names: {', '.join(OPTIMIZERS)}"
        )
    args = _arguments(name)
    for key in kwargs or {}:
        if key in _FIELDS.get(name, ()) or key == "weight_decay":
            raise ValueError(f"optim.kwargs.{key}: set optim.{key} instead")
        if key not in args:
            raise ValueError(
                f"optim.kwargs.{key} is not an argument of optax.{name}; its arguments: "
                f"{', '.join(args)}"
            )
    try:
        getattr(optax, name)(1e-3, **dict(kwargs or {}))
    except (TypeError, ValueError) as e:
        raise ValueError(f"optim.kwargs: optax.{name} refused them: {e}") from e


def build(o: Any, lr: optax.ScalarOrSchedule) -> optax.GradientTransformation:
    """The optimizer of the ``optim`` section ``o`` at learning rate ``lr`` (module doc).

    Example:
      >>> from jlora.train.sections import OptimConfig
      >>> tx = build(OptimConfig(name="adafactor", kwargs={"factored": False}), 1e-3)
      >>> callable(tx.update)
      True
    """
    fn, kw = getattr(optax, o.name), dict(o.kwargs or {})
    if o.name in ("adam", "adamw"):
        kw.update(b1=o.b1, b2=o.b2, eps=o.eps)
    if o.name == "sgd":
        kw.update(momentum=o.momentum or None)
    decay = []
    if "weight_decay" in _arguments(o.name):
        kw["weight_decay"] = o.weight_decay
    elif o.weight_decay:
        decay = [optax.add_decayed_weights(o.weight_decay)]
    if o.name == "adamw":  # the state layouts of earlier runs' checkpoints, kept
        return fn(lr, **kw)
    return optax.chain(*decay, fn(lr, **kw))
