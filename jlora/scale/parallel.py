"""Data-parallel and sharded training steps for LoRA: `jax.pmap` and `jax.jit` on a mesh.

Both steps differentiate the loss with respect to the adapters only: the frozen half of
`jlora.split` is an ordinary input that is never differentiated, so no gradient (and no
optimizer state) is ever computed for W.

* `sharded_train_step`: ``jax.jit`` with in/out `NamedSharding` s on a ``(data, fsdp, tensor)``
  mesh (see `jlora.sharding`); XLA inserts the collectives. This is the recommended path, on one
  host or many.
* `pmap_train_step`: the classic `jax.pmap` data-parallel step: frozen weights, adapters and
  optimizer state replicated on every device, the batch split along a leading device axis, and
  the adapter gradients averaged with `jax.lax.pmean`.

The loss function takes the combined tree (``jlora.combine(frozen, adapters)``) and a batch::

    def loss_fn(tree, batch):
        logits = jlora.lora(model.apply)({"params": tree}, batch["ids"])
        return optax.softmax_cross_entropy_with_integer_labels(logits, batch["labels"]).mean()
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import jax
import numpy as np
import optax
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from jlora.core.tree import combine
from jlora.scale.sharding import data_sharding, named_shardings, opt_state_specs

__all__ = [
    "init_opt_state",
    "pmap_train_step",
    "replicate",
    "sharded_train_step",
    "split_batch",
    "train_step",
]

LossFn = Callable[[Any, Any], Any]


def train_step(loss_fn: LossFn, tx: optax.GradientTransformation, *, has_aux: bool = False):
    """The plain (single-device, unjitted) step that the parallel steps wrap.

    Args:
      loss_fn: ``loss_fn(tree, batch) -> loss`` (or ``(loss, aux)`` with ``has_aux``), where
        ``tree`` is ``jlora.combine(frozen, adapters)``.
      tx: the optimizer, e.g. ``jlora.optimizer(optax.adamw(1e-4), adapters)``.
      has_aux: ``loss_fn`` returns ``(loss, aux)``.

    Returns:
      ``step(frozen, adapters, opt_state, batch) -> (adapters, opt_state, loss)`` (plus ``aux``
      last with ``has_aux``).

    Example:
      >>> import jax, jax.numpy as jnp, optax, jlora
      >>> tree = jlora.init({"k": jnp.ones((4, 2))}, jlora.LoraConfig(rank=1, targets="k"),
      ...                   key=jax.random.key(0))
      >>> frozen, adapters = jlora.split(tree)
      >>> def loss_fn(tree, batch):
      ...     return jnp.mean((jlora.lora(lambda p, x: x @ p["k"])(tree, batch["x"]) - 1) ** 2)
      >>> tx = jlora.optimizer(optax.sgd(0.1), adapters)
      >>> step = jax.jit(train_step(loss_fn, tx))
      >>> adapters, opt_state, loss = step(frozen, adapters, tx.init(adapters),
      ...                                  {"x": jnp.ones((3, 4))})
      >>> float(loss)
      9.0
    """
    return _step(loss_fn, tx, has_aux=has_aux, axis_name=None)


def _step(loss_fn: LossFn, tx, *, has_aux: bool, axis_name: str | None):
    def step(frozen, adapters, opt_state, batch):
        def loss_of(ad):
            return loss_fn(combine(frozen, ad), batch)

        out, grads = jax.value_and_grad(loss_of, has_aux=has_aux)(adapters)
        loss, aux = out if has_aux else (out, None)
        if axis_name is not None:
            grads = jax.lax.pmean(grads, axis_name)
            loss = jax.lax.pmean(loss, axis_name)
            aux = jax.lax.pmean(aux, axis_name)
        updates, opt_state = tx.update(grads, opt_state, adapters)
        adapters = optax.apply_updates(adapters, updates)
        return (adapters, opt_state, loss, aux) if has_aux else (adapters, opt_state, loss)

    return step


# pmap ------------------------------------------------------------------------------------------


def pmap_train_step(
    loss_fn: LossFn,
    tx: optax.GradientTransformation,
    *,
    axis_name: str = "batch",
    devices: Sequence[jax.Device] | None = None,
    has_aux: bool = False,
):
    """A `jax.pmap` data-parallel step: adapter gradients (and the loss) are ``pmean``-ed.

    Frozen weights, adapters and optimizer state are not mapped (``in_axes=None``): each device
    holds a full replica (use `replicate` once so they are not copied every step) and the step
    returns them replicated. The batch is mapped over its leading axis, which must equal the
    number of devices (`split_batch`). Each device differentiates its own shard's mean loss with
    respect to the adapters only; averaging those gradients equals the gradient of the global
    mean loss, so all replicas apply the same update.

    Args:
      loss_fn: ``loss_fn(tree, batch) -> loss`` (or ``(loss, aux)``); see `train_step`.
      tx: the optimizer.
      axis_name: the pmap axis name.
      devices: the devices (default: all local devices).
      has_aux: ``loss_fn`` returns ``(loss, aux)``; ``aux`` is ``pmean``-ed too.

    Returns:
      ``step(frozen, adapters, opt_state, batch) -> (adapters, opt_state, loss)`` with ``batch``
      leaves of shape ``(n_devices, per_device_batch, ...)``.

    Example:
      >>> import jax, jax.numpy as jnp, optax, jlora
      >>> tree = jlora.init({"k": jnp.ones((4, 2))}, jlora.LoraConfig(rank=1, targets="k"),
      ...                   key=jax.random.key(0))
      >>> frozen, adapters = jlora.split(tree)
      >>> def loss_fn(tree, batch):
      ...     return jnp.mean((jlora.lora(lambda p, x: x @ p["k"])(tree, batch["x"]) - 1) ** 2)
      >>> tx = jlora.optimizer(optax.sgd(0.1), adapters)
      >>> step = pmap_train_step(loss_fn, tx)
      >>> n = jax.local_device_count()
      >>> batch = split_batch({"x": jnp.ones((2 * n, 4))}, n)
      >>> frozen, adapters, opt_state = replicate((frozen, adapters, tx.init(adapters)))
      >>> adapters, opt_state, loss = step(frozen, adapters, opt_state, batch)
      >>> float(loss)
      9.0
    """
    devices = list(jax.local_devices() if devices is None else devices)
    step = _step(loss_fn, tx, has_aux=has_aux, axis_name=axis_name)
    n_out = 4 if has_aux else 3
    return jax.pmap(
        step,
        axis_name=axis_name,
        in_axes=(None, None, None, 0),
        out_axes=(None,) * n_out,
        devices=devices,
    )


def replicate(
    tree: Any, devices: Sequence[jax.Device] | None = None, *, axis_name: str = "batch"
) -> Any:
    """Put a full copy of ``tree`` on each device (for the unmapped inputs of `pmap_train_step`).

    Example:
      >>> import jax.numpy as jnp
      >>> x = replicate({"w": jnp.ones(3)})["w"]
      >>> len(x.sharding.device_set) == jax.local_device_count(), x.sharding.spec
      (True, P())
    """
    devices = list(jax.local_devices() if devices is None else devices)
    mesh = Mesh(np.array(devices), (axis_name,))
    sharding = NamedSharding(mesh, PartitionSpec())
    # A fresh copy (see jlora.sharding.shard): the step's outputs may be donated later.
    return jax.tree.map(
        lambda x: jax.device_put(jax.numpy.copy(x) if isinstance(x, jax.Array) else x, sharding),
        tree,
    )


def split_batch(batch: Any, n: int | None = None) -> Any:
    """Reshape each leaf ``(B, ...)`` to ``(n, B // n, ...)`` for `pmap_train_step`.

    Args:
      batch: a tree of arrays with a common leading batch axis.
      n: number of devices (default ``jax.local_device_count()``).

    Raises:
      ValueError: a leaf is a scalar or its batch size is not divisible by ``n``.

    Example:
      >>> split_batch({"x": np.zeros((8, 3))}, 4)["x"].shape
      (4, 2, 3)
      >>> split_batch({"x": np.zeros((6, 3))}, 4)
      Traceback (most recent call last):
      ...
      ValueError: batch leaf 'x' with shape (6, 3): the batch size 6 is not divisible by 4 devices.
    """
    n = jax.local_device_count() if n is None else n

    def one(path, x):
        name = jax.tree_util.keystr(path, simple=True, separator="/")
        if np.ndim(x) == 0:
            raise ValueError(f"batch leaf {name!r} is a scalar; it needs a batch axis.")
        if x.shape[0] % n:
            raise ValueError(
                f"batch leaf {name!r} with shape {tuple(x.shape)}: the batch size {x.shape[0]} "
                f"is not divisible by {n} devices."
            )
        return x.reshape(n, x.shape[0] // n, *x.shape[1:])

    return jax.tree_util.tree_map_with_path(one, batch)


# jit on a mesh ---------------------------------------------------------------------------------


def init_opt_state(
    tx: optax.GradientTransformation, adapters: Any, mesh: Mesh, adapter_specs: Any
) -> tuple[Any, Any]:
    """``tx.init(adapters)`` created directly with the adapters' shardings.

    Returns:
      ``(opt_state, opt_specs)``: the sharded state, and its specs (`jlora.sharding.opt_state_specs`)
      for `sharded_train_step`.

    Example:
      >>> import jax, jax.numpy as jnp, optax, jlora
      >>> js = jlora.sharding
      >>> tree = jlora.init({"k": jnp.ones((8, 8))}, jlora.LoraConfig(rank=2, targets="k"),
      ...                   key=jax.random.key(0))
      >>> _, adapters = jlora.split(tree)
      >>> mesh = js.make_mesh()
      >>> specs = js.lora_specs(adapters, js.base_specs(tree, "fsdp", mesh, fsdp_min_size=1))
      >>> tx = jlora.optimizer(optax.adam(1e-3), adapters)
      >>> state, state_specs = init_opt_state(tx, js.shard(adapters, mesh, specs), mesh, specs)
      >>> state.inner_states["lora"].inner_state[0].mu["k"].a.sharding.spec
      P('fsdp', None)
    """
    abstract = jax.eval_shape(tx.init, adapters)
    specs = opt_state_specs(tx, abstract, adapter_specs)
    shardings = named_shardings(abstract, mesh, specs)
    return jax.jit(tx.init, out_shardings=shardings)(adapters), specs


def sharded_train_step(
    loss_fn: LossFn,
    tx: optax.GradientTransformation,
    mesh: Mesh,
    frozen_specs: Any,
    adapter_specs: Any,
    opt_specs: Any,
    *,
    has_aux: bool = False,
    donate: bool = True,
):
    """A ``jax.jit`` step with explicit in/out shardings on ``mesh``.

    The frozen tree, adapters and optimizer state keep the shardings of their specs (from
    `jlora.sharding.lora_specs` and `init_opt_state`); the batch is split by
    `jlora.sharding.data_sharding` (over ``data`` and ``fsdp``). XLA's SPMD partitioner adds
    the collectives: all-gathers of FSDP-sharded weights, all-reduces for row-parallel matmuls and
    of the adapter gradients over the batch axes. Gradients are taken with respect to the
    adapters only.

    Args:
      loss_fn: ``loss_fn(tree, batch) -> loss`` (or ``(loss, aux)``); see `train_step`.
      tx: the optimizer.
      mesh: the device mesh (`jlora.sharding.make_mesh`).
      frozen_specs, adapter_specs: `PartitionSpec` trees for the two halves of `jlora.split`.
      opt_specs: the optimizer state's specs.
      has_aux: ``loss_fn`` returns ``(loss, aux)`` (``aux`` comes back replicated).
      donate: donate the adapters and optimizer state buffers (they are replaced each step).

    Returns:
      ``step(frozen, adapters, opt_state, batch) -> (adapters, opt_state, loss)`` (plus ``aux``).

    Example:
      >>> import jax, jax.numpy as jnp, optax, jlora
      >>> js = jlora.sharding
      >>> tree = jlora.init({"k": jnp.ones((4, 2))}, jlora.LoraConfig(rank=1, targets="k"),
      ...                   key=jax.random.key(0))
      >>> mesh = js.make_mesh()
      >>> specs = js.lora_specs(tree, js.base_specs(tree, "fsdp", mesh, fsdp_min_size=1))
      >>> frozen, adapters = jlora.split(js.shard(tree, mesh, specs))
      >>> f_specs, a_specs = jlora.split(specs)
      >>> tx = jlora.optimizer(optax.sgd(0.1), adapters)
      >>> opt_state, o_specs = init_opt_state(tx, adapters, mesh, a_specs)
      >>> def loss_fn(tree, batch):
      ...     return jnp.mean((jlora.lora(lambda p, x: x @ p["k"])(tree, batch["x"]) - 1) ** 2)
      >>> step = sharded_train_step(loss_fn, tx, mesh, f_specs, a_specs, o_specs)
      >>> batch = js.shard_batch({"x": jnp.ones((len(jax.devices()), 4))}, mesh)
      >>> adapters, opt_state, loss = step(frozen, adapters, opt_state, batch)
      >>> float(loss)
      9.0
    """

    def named(specs):
        return jax.tree.map(
            lambda s: NamedSharding(mesh, s),
            specs,
            is_leaf=lambda x: isinstance(x, PartitionSpec),
        )

    replicated = NamedSharding(mesh, PartitionSpec())
    a_sh, o_sh = named(adapter_specs), named(opt_specs)
    outs = (a_sh, o_sh, replicated) + ((replicated,) if has_aux else ())
    return jax.jit(
        _step(loss_fn, tx, has_aux=has_aux, axis_name=None),
        in_shardings=(named(frozen_specs), a_sh, o_sh, data_sharding(mesh)),
        out_shardings=outs,
        donate_argnums=(1, 2) if donate else (),
    )
