"""Several named adapters on one frozen base, weighted combinations, and mixed-adapter batches.

This module gathers the public names of `jlora.variants.adapter_set` (`AdapterSet`) and
`jlora.variants.mixed` (`MultiLoraWeight`, `route`). `AdapterSet` keeps the frozen params once (``base``) and, per adapter name, only that adapter's
parts: its `LoraWeight` nodes with ``w=None`` and its `Trainable` leaves, keyed by path.
`AdapterSet.tree` builds a tree for `jlora.lora` by putting the *same* frozen array objects
under every adapter, so adding, selecting, deleting or combining adapters never copies W.

Mixed batches: `AdapterSet.stack` gives a tree of `MultiLoraWeight` nodes (the adapters'
``a``/``b`` stacked, ranks zero-padded to the largest), `route` tells them which adapter each
example uses (an index into the stacked names, or -1 for none), and `jlora.lora` runs the whole
batch in one forward: its ``dot_general`` rule gathers each example's ``a``, ``b`` and scale.
The rule plugs into the interpreter through the node protocol (`jlora.core.node.register`).

Multitask training (`jlora.variants.multitask`): `init_tasks` stacks one fresh adapter per
task, `task_ids` / `route` route a mixed batch, `per_task_mean` gives the loss whose gradient
per adapter is that task's own, and `unstack` gives the trained adapters back as an `AdapterSet`.

Example:
  >>> import jax, jax.numpy as jnp, jlora
  >>> params = {"dense": {"kernel": jnp.ones((4, 3))}}
  >>> cfg = jlora.LoraConfig(rank=2, alpha=2)
  >>> t1 = jlora.init(params, cfg, key=jax.random.key(1))
  >>> t2 = jlora.init(params, cfg, key=jax.random.key(2))
  >>> s = AdapterSet.from_tree(t1, "one").add("two", t2).select("two")
  >>> s.names, s.active
  (('one', 'two'), 'two')
  >>> s.tree()["dense"]["kernel"].w is s.tree("one")["dense"]["kernel"].w
  True
"""

from jlora.variants.adapter_set import AdapterSet
from jlora.variants.mixed import DENSE_MAX_RANK, MultiLoraWeight, route
from jlora.variants.multitask import init_tasks, per_task_mean, task_ids, unstack

__all__ = [
    "DENSE_MAX_RANK",
    "AdapterSet",
    "MultiLoraWeight",
    "init_tasks",
    "per_task_mean",
    "route",
    "task_ids",
    "unstack",
]
