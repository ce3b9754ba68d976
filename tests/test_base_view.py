"""`jlora.base(tree)`: the model with every adapter off, as a view of the same tree.

Against the plain forward of the original params (float64 dequantized W for an NF4 base), with
random non-zero adapters (so that the adapters-on model differs), under jit and not, for LoRA,
DoRA and an NF4-quantized base; the view holds the tree's own arrays (no copy of W), and under
jit the compiled program takes the tree as its arguments and allocates no W-sized buffer.
"""

from __future__ import annotations

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from absl.testing import parameterized
from flax import linen as nn

import jlora


class MLP(nn.Module):
    @nn.compact
    def __call__(self, x):
        x = nn.gelu(nn.Dense(64, name="fc2")(x))
        return nn.Dense(8, name="out")(x)


MODEL = MLP()
X = jnp.asarray(np.random.default_rng(0).normal(size=(4, 64)), jnp.float32)
PARAMS = MODEL.init(jax.random.key(0), X[:1])["params"]
CONFIGS = {
    "lora": jlora.LoraConfig(rank=4, alpha=8, targets="all-linear", trainable=["out/bias"]),
    "dora": jlora.LoraConfig(rank=4, alpha=8, targets="all-linear", variant="dora"),
    "nf4": jlora.LoraConfig(rank=4, alpha=8, targets="all-linear"),
}


def _tree(kind: str, np_ref) -> tuple[dict, dict]:
    """``(tree with random non-zero adapters, its plain params for the reference)``."""
    tree = np_ref.randomize(jlora.init(PARAMS, CONFIGS[kind], key=jax.random.key(1)), seed=2)
    if kind != "nf4":
        return tree, PARAMS
    tree = jlora.quant.quantize(tree, method="nf4", block_size=64)
    plain = jax.tree.map(
        lambda x: (
            np_ref.dequantize(x.w).astype(np.float32) if isinstance(x, jlora.LoraWeight) else x
        ),
        tree,
        is_leaf=lambda x: isinstance(x, jlora.LoraWeight),
    )
    return tree, plain


@pytest.mark.usefixtures("np_ref_attr")
class BaseViewTest(chex.TestCase, parameterized.TestCase):
    @chex.variants(with_jit=True, without_jit=True)
    @parameterized.parameters("lora", "dora", "nf4")
    def test_adapters_off_is_the_plain_model(self, kind):
        tree, plain = _tree(kind, self.np_ref)

        @self.variant
        def off(tree, x):
            return jlora.lora(MODEL.apply)({"params": jlora.base(tree)}, x)

        @self.variant
        def on(tree, x):
            return jlora.lora(MODEL.apply)({"params": tree}, x)

        want = MODEL.apply({"params": plain}, X)
        chex.assert_trees_all_close(off(tree, X), want, atol=2e-5, rtol=2e-5)
        # the adapters are not zero: with them on, the model is another one
        assert float(jnp.max(jnp.abs(on(tree, X) - want))) > 1e-2


def test_the_view_holds_the_trees_own_arrays(np_ref):
    tree, _ = _tree("nf4", np_ref)
    lora_tree, _ = _tree("lora", np_ref)
    view = jlora.base(tree)
    node = tree["fc2"]["kernel"]
    assert view["fc2"]["kernel"] is node.w and isinstance(node.w, jlora.quant.NF4Weight)
    assert view["fc2"]["bias"] is tree["fc2"]["bias"]  # a frozen leaf, as it is
    trained = lora_tree["out"]["bias"]  # a Trainable leaf keeps its value
    assert isinstance(trained, jlora.Trainable) and jlora.base(lora_tree)["out"]["bias"] is trained
    # no adapter node is left, and the view splits into a frozen half alone
    nodes = jax.tree.leaves(view, is_leaf=lambda x: isinstance(x, jlora.LoraWeight))
    assert not any(isinstance(x, jlora.LoraWeight) for x in nodes)


def test_no_copy_of_w_under_jit(np_ref):
    """The compiled adapters-off forward reads the tree's buffers: its arguments are exactly the
    view's bytes and x's, and its temporaries are far below one W (they are the activations)."""
    tree, _ = _tree("lora", np_ref)

    def off(tree, x):
        return jlora.lora(MODEL.apply)({"params": jlora.base(tree)}, x)

    def plain(params, x):
        return MODEL.apply({"params": params}, x)

    mem = jax.jit(off).lower(tree, X).compile().memory_analysis()
    ref = jax.jit(plain).lower(PARAMS, X).compile().memory_analysis()
    view_bytes = sum(x.nbytes for x in jax.tree.leaves(jlora.base(tree)))
    w_bytes = PARAMS["fc2"]["kernel"].nbytes
    # the frozen W, biases and trainable leaves, and x: the adapters a, b are not even read
    assert mem.argument_size_in_bytes == view_bytes + X.nbytes
    assert mem.temp_size_in_bytes <= ref.temp_size_in_bytes + 1024 < w_bytes
