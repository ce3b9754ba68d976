"""Sharding LoRA trees over a device mesh: specs for every `LoraWeight`, presets, placement.

jlora does not ship a partitioner: it derives `jax.sharding.PartitionSpec` s and lets JAX (jit
with `NamedSharding` s, XLA's SPMD partitioner) do the rest.

**How adapters are sharded.** Given the spec of a frozen kernel W, `lora_specs` gives its
adapters

* ``a`` (``batch + in + (r,)``): W's spec on the batch (stacked-layer) and input axes; the rank
  axis replicated;
* ``b`` (``batch + (r,) + out``): W's spec on the batch and output axes; the rank axis
  replicated.

Why: ``x @ a`` contracts the same axes as ``x @ W``, so it needs the same collective as the
base matmul over the input axis (none for a column-parallel W, an all-reduce for a row-parallel
one), but on an ``(..., r)`` result instead of an ``(..., out)`` one; ``(x a) @ b`` is then
sharded on the output axis exactly like ``x @ W``. The low-rank path therefore never needs more
communication than the base matmul, and the rank axis (8--64) is far too small to be worth
splitting. Batch axes follow W so that an ``nn.scan`` over layers slices W and its adapters
alike.

**Presets** (`base_specs`), combinable with ``+``:

* ``"data"``: every parameter replicated; only the batch is split (over ``data`` and ``fsdp``,
  see `data_sharding`).
* ``"fsdp"``: every parameter of at least ``fsdp_min_size`` elements is split over ``fsdp`` on
  its largest dimension that the axis size divides (ZeRO-3 / FSDP: gathered just in time for the
  matmul). The adapters follow W, and with ``lora_specs(..., shard_factors="fsdp")`` (what
  `shard` does for these presets) the factor W's split leaves whole is split too, so adapters
  and their optimizer state are sharded like W.
* ``"tensor"``: Megatron-style tensor parallelism over ``tensor`` (`preset_rules`):
  q/k/v/gate/up projections (and BERT query/key/value/intermediate, the LM head) are
  column-parallel (output dimension split), o/down projections (BERT ``output/dense``) are
  row-parallel (input dimension split), the token embedding is split over the vocabulary (or,
  when the vocabulary does not divide, over the features).
* ``"fsdp+tensor"``: tensor rules first, then FSDP on the largest remaining dimension.

**Where the tensor rules come from.** The rules above are the models', not scale's:
``TENSOR_PARALLEL_RULES`` in `jlora.interop.parallel_rules`, beside the models they describe.
`jlora.interop` and `jlora.scale` sit side by side and neither imports the other; the top package
(``jlora/__init__.py``) registers the models' rules with `register_tensor_rules` on import, so
``preset_rules("tensor")`` starts with them, in their order, followed by any rules other code
registers.

**Layout.** `presets` (mesh axes, `make_mesh`, preset names and their rules), `specs`
(`base_specs`, `lora_specs`, `opt_state_specs`, spec checks), `placement` (`shard`,
`named_shardings`, `data_sharding`, `shard_batch`).

Example:
  >>> import jax, jax.numpy as jnp, jlora
  >>> js = jlora.sharding
  >>> params = {"q_proj": {"kernel": jnp.ones((16, 32))}, "o_proj": {"kernel": jnp.ones((32, 16))}}
  >>> tree = jlora.init(params, jlora.LoraConfig(rank=4), key=jax.random.key(0))
  >>> mesh = js.make_mesh(data=1)
  >>> specs = js.lora_specs(tree, js.base_specs(tree, "tensor", mesh))
  >>> specs["q_proj"]["kernel"].w, specs["q_proj"]["kernel"].a, specs["q_proj"]["kernel"].b
  (P(None, 'tensor'), P(None, None), P(None, 'tensor'))
  >>> specs["o_proj"]["kernel"].a, specs["o_proj"]["kernel"].b
  (P('tensor', None), P(None, None))
  >>> sharded = js.shard(tree, mesh, specs)
  >>> sharded["q_proj"]["kernel"].w.sharding.spec
  P(None, 'tensor')
"""

from jlora.scale.sharding.placement import data_sharding, named_shardings, shard, shard_batch
from jlora.scale.sharding.presets import (
    AXES,
    DATA,
    FSDP,
    PRESETS,
    TENSOR,
    make_mesh,
    preset_rules,
    register_tensor_rules,
)
from jlora.scale.sharding.presets import Rules as Rules  # the rules' type, not in __all__
from jlora.scale.sharding.specs import base_specs, lora_specs, opt_state_specs

__all__ = [
    "AXES",
    "DATA",
    "FSDP",
    "PRESETS",
    "TENSOR",
    "base_specs",
    "data_sharding",
    "lora_specs",
    "make_mesh",
    "named_shardings",
    "opt_state_specs",
    "preset_rules",
    "register_tensor_rules",
    "shard",
    "shard_batch",
]
