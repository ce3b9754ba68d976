"""Zero-config axes: `jlora.init(..., apply=...)` reads each kernel's layout from the program."""

import dataclasses
import re
import warnings

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jlora


class Block(nn.Module):
    """Einsum attention-like projections and a Dense MLP, as in scanned TPU code bases."""

    @nn.compact
    def __call__(self, x, _):
        q = nn.Einsum((8, 2, 4), "btd,dhk->bthk", name="q")(x)
        o = nn.Einsum((2, 4, 8), "bthk,hkd->btd", name="o")(jnp.tanh(q))
        return x + nn.Dense(8, name="mlp")(o), None


class Stack(nn.Module):
    @nn.compact
    def __call__(self, x):
        scan = nn.scan(Block, variable_axes={"params": 0}, split_rngs={"params": True}, length=3)
        return scan(name="layers")(x, None)[0]


HAND = {  # the axes_pattern a user would have to write by hand
    "q/kernel": ((0,), (1,)),
    "o/kernel": ((0,), (1, 2)),
    "mlp/kernel": ((0,), (1,)),
}


def _randomize_b(tree):
    rng = np.random.default_rng(1)

    def one(x):
        if isinstance(x, jlora.LoraWeight):
            b = jnp.asarray(rng.normal(size=x.b.shape) * 0.3, x.b.dtype)
            return jlora.LoraWeight(
                x.w, x.a, b, scale=x.scale, batch_axes=x.batch_axes, in_axes=x.in_axes,
                out_axes=x.out_axes,
            )  # fmt: skip
        return x

    return jax.tree.map(one, tree, is_leaf=jlora.core.node.is_node)


def _np_merged(lw, xp=np):
    """W + s·a@b (float64 numpy, or ``xp=jnp`` to differentiate), from the node's axes alone
    (independent of jlora.merge / LoraWeight.delta)."""
    if xp is np:
        w, a, b = (np.asarray(v, np.float64) for v in (lw.w, lw.a, lw.b))
    else:
        w, a, b = lw.w, lw.a, lw.b
    nb = len(lw.batch_axes)
    bs = a.shape[:nb]
    a2 = a.reshape(*bs, -1, a.shape[-1])
    b2 = b.reshape(*bs, b.shape[nb], -1)
    d = xp.matmul(a2, b2)  # batch + (in_flat, out_flat)
    ins = [lw.shape[i] for i in lw.in_axes]
    outs = [lw.shape[i] for i in lw.out_axes]
    d = d.reshape(*bs, *ins, *outs)
    canonical = (*lw.batch_axes, *lw.in_axes, *lw.out_axes)
    return w + lw.scale * xp.transpose(d, tuple(np.argsort(canonical)))


def _merged_params(tree):
    return jax.tree.map(
        lambda x: jnp.asarray(_np_merged(x), jnp.float32) if isinstance(x, jlora.LoraWeight) else x,
        tree,
        is_leaf=lambda x: isinstance(x, jlora.LoraWeight),
    )


def _stack():
    m = Stack()
    x = jnp.asarray(np.random.default_rng(0).normal(size=(2, 5, 8)), jnp.float32)
    params = m.init(jax.random.key(0), x)["params"]
    return m, x, params


def test_scanned_einsum_stack_axes_equal_the_hand_written_ones():
    m, x, params = _stack()
    apply = lambda p, x: m.apply({"params": p}, x)  # noqa: E731
    cfg = jlora.LoraConfig(rank=2, targets="kernel")
    spec = jax.ShapeDtypeStruct(x.shape, x.dtype)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        tree = jlora.init(params, cfg, key=jax.random.key(1), apply=apply, args=(spec,))
    hand = jlora.init(
        params, jlora.LoraConfig(rank=2, targets="kernel", axes_pattern=HAND), key=jax.random.key(1)
    )
    for name in ("q", "o", "mlp"):
        got, want = tree["layers"][name]["kernel"], hand["layers"][name]["kernel"]
        assert (got.batch_axes, got.in_axes, got.out_axes) == (
            want.batch_axes,
            want.in_axes,
            want.out_axes,
        )
        assert got.a.shape == want.a.shape and got.b.shape == want.b.shape
    assert tree["layers"]["q"]["kernel"].a.shape == (3, 8, 2)  # per-layer adapters
    assert tree["layers"]["o"]["kernel"].b.shape == (3, 2, 8)


@pytest.mark.parametrize("jit", [False, True])
def test_scanned_stack_fused_equals_numpy_merged_and_gradients(jit):
    m, x, params = _stack()
    apply = lambda p, x: m.apply({"params": p}, x)  # noqa: E731
    tree = jlora.init(
        params,
        jlora.LoraConfig(rank=2, targets="kernel"),
        key=jax.random.key(1),
        apply=apply,
        args=(x,),
    )
    tree = _randomize_b(tree)
    fused = jlora.lora(apply)
    if jit:
        fused = jax.jit(fused)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no silent materialization anywhere
        y = fused(tree, x)
    ref = m.apply({"params": _merged_params(tree)}, x)
    np.testing.assert_allclose(np.asarray(y), np.asarray(ref), rtol=1e-4, atol=1e-4)  # |y| ~ 30

    frozen, adapters = jlora.split(tree)

    def loss_fused(ad):
        return jnp.sum(jlora.lora(apply)(jlora.combine(frozen, ad), x) ** 2)

    def loss_merged(ad):  # the same model on W + s·a@b formed here with einsum
        def merge(f, t):
            if not isinstance(f, jlora.LoraWeight):
                return f
            return _np_merged(jlora.combine(f, t), xp=jnp)

        merged = jax.tree.map(
            merge, frozen, ad, is_leaf=lambda v: isinstance(v, jlora.LoraWeight) or v is None
        )
        return jnp.sum(m.apply({"params": merged}, x) ** 2)

    g1 = jax.grad(loss_fused)(adapters)
    g2 = jax.grad(loss_merged)(adapters)
    # both float32; the two programs sum in other orders (|g| reaches ~2e3 here)
    chex.assert_trees_all_close(g1, g2, rtol=1e-3, atol=1e-3)
    assert float(jnp.abs(g1["layers"]["q"]["kernel"].b).sum()) > 0


def test_plain_function_nested_scans_and_lax_scan_params():
    w = jnp.asarray(
        np.random.default_rng(0).normal(size=(2, 3, 6, 6)) * 0.3, jnp.float32
    )  # (outer, inner, in, out)
    params = {"blocks": {"kernel": w}}

    def apply(p, x):
        def outer(h, k_outer):
            def inner(h, k):
                return jnp.tanh(h @ k), None

            return jax.lax.scan(inner, h, k_outer)[0], None

        return jax.lax.scan(outer, x, p["blocks"]["kernel"])[0]

    x = jnp.asarray(np.random.default_rng(0).normal(size=(4, 6)), jnp.float32)
    tree = jlora.init(
        params, jlora.LoraConfig(rank=2, targets="kernel"), key=jax.random.key(2),
        apply=apply, args=(x,),
    )  # fmt: skip
    lw = tree["blocks"]["kernel"]
    assert (lw.batch_axes, lw.in_axes, lw.out_axes) == ((0, 1), (2,), (3,))
    tree = _randomize_b(tree)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        y = jlora.lora(apply)(tree, x)
    merged = _np_merged(tree["blocks"]["kernel"])
    h = np.asarray(x, np.float64)
    for i in range(2):
        for j in range(3):
            h = np.tanh(h @ merged[i, j])
    np.testing.assert_allclose(np.asarray(y), h, rtol=2e-5, atol=2e-5)


def test_tied_embedding_lookup_and_attend():
    table = jnp.asarray(np.random.default_rng(0).normal(size=(10, 6)), jnp.float32)
    params = {"embed": {"embedding": table}}

    def apply(p, ids):
        e = p["embed"]["embedding"]
        return jnp.take(e, ids, axis=0) @ e.T  # lookup, then the transposed use (attend)

    ids = jnp.array([[1, 2, 3]])
    tree = jlora.init(
        params, jlora.LoraConfig(rank=2, targets="embedding"), key=jax.random.key(0),
        apply=apply, args=(ids,),
    )  # fmt: skip
    lw = tree["embed"]["embedding"]
    assert (lw.in_axes, lw.out_axes) == ((0,), (1,))


def test_incompatible_uses_name_the_path_and_both_uses():
    params = {"k": jnp.zeros((4, 6, 8))}

    def apply(p, x, y):
        return (
            jnp.einsum("bi,ijk->bjk", x, p["k"]).sum() + jnp.einsum("bj,ijk->bik", y, p["k"]).sum()
        )

    x, y = jnp.ones((2, 4)), jnp.ones((2, 6))
    with pytest.raises(
        ValueError,
        match=r"the kernel k \(ndim 3\) is used in two incompatible ways: dot_general .*input "
        r"axes \(0,\).* and dot_general .*input axes \(1,\)",
    ):
        jlora.init(params, jlora.LoraConfig(rank=2, targets="k"), key=jax.random.key(0),
                   apply=apply, args=(x, y))  # fmt: skip


def test_explicit_axes_pattern_wins():
    m, x, params = _stack()
    cfg = jlora.LoraConfig(rank=2, targets="kernel", axes_pattern={"mlp/kernel": ((), (0, 1))})
    tree = jlora.init(
        params, cfg, key=jax.random.key(1), apply=lambda p, x: m.apply({"params": p}, x), args=(x,)
    )
    assert tree["layers"]["mlp"]["kernel"].batch_axes == ()
    assert tree["layers"]["q"]["kernel"].batch_axes == (0,)


def test_ambiguous_kernel_warns_without_apply():
    _, _, params = _stack()
    with pytest.warns(
        UserWarning, match=re.escape("['layers']['o']['kernel'] has shape (3, 2, 4, 8)")
    ):
        jlora.init(params, jlora.LoraConfig(rank=2, targets="kernel"), key=jax.random.key(1))
    conv = {"conv": {"kernel": jnp.zeros((3, 3, 4, 5))}}
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a conv kernel's default layout is right: no warning
        jlora.init(conv, jlora.LoraConfig(rank=2, targets="kernel"), key=jax.random.key(1))


# --- an NNX stack: modules made by nnx.vmap, run by nnx.scan (a lax.scan over the state) -------


def _nnx_stack():
    nnx = pytest.importorskip("flax.nnx")

    class NnxBlock(nnx.Module):
        def __init__(self, rngs):
            self.q = nnx.Einsum("btd,dhk->bthk", (8, 2, 4), rngs=rngs)
            self.o = nnx.Einsum("bthk,hkd->btd", (2, 4, 8), rngs=rngs)
            self.mlp = nnx.Linear(8, 8, rngs=rngs)

        def __call__(self, x):
            return x + self.mlp(self.o(jnp.tanh(self.q(x))))

    @nnx.vmap(in_axes=0, out_axes=0)
    def create(key):
        return NnxBlock(nnx.Rngs(key))

    graphdef, state = nnx.split(create(jax.random.split(jax.random.key(0), 3)))

    def apply(state, x):
        @nnx.scan(in_axes=(0, nnx.Carry), out_axes=nnx.Carry)
        def step(block, x):
            return block(x)

        return step(nnx.merge(graphdef, state), x)

    return state, apply


def _nodes(tree):
    leaves = jax.tree_util.tree_flatten_with_path(tree, is_leaf=jlora.core.node.is_node)[0]
    return {jlora.core.targets.path_str(p): v for p, v in leaves}


def test_nnx_stack_axes_fused_numpy_and_gradients():
    state, apply = _nnx_stack()
    x = jnp.asarray(np.random.default_rng(0).normal(size=(2, 5, 8)), jnp.float32)
    cfg = jlora.LoraConfig(rank=2, targets="kernel")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        tree = jlora.init(state, cfg, key=jax.random.key(1), apply=apply, args=(x,))
    hand = {f"{k.split('/')[0]}/kernel": v for k, v in HAND.items()}
    want = jlora.init(state, dataclasses.replace(cfg, axes_pattern=hand), key=jax.random.key(1))
    got, want = _nodes(tree), _nodes(want)
    for path in ("q/kernel/value", "o/kernel/value", "mlp/kernel/value"):
        g, w = got[path], want[path]
        assert (g.batch_axes, g.in_axes, g.out_axes) == (w.batch_axes, w.in_axes, w.out_axes)
        assert g.a.shape[0] == 3  # per-layer adapters
    tree = _randomize_b(tree)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        y = jax.jit(jlora.lora(apply))(tree, x)
    nodes = _nodes(tree)
    q, o, m = (_np_merged(nodes[f"{n}/kernel/value"]) for n in ("q", "o", "mlp"))
    bias = np.asarray(nodes["mlp/bias/value"], np.float64)
    h = np.asarray(x, np.float64)
    for i in range(3):  # the stack in float64 numpy on the merged per-layer kernels
        t = np.tanh(np.einsum("btd,dhk->bthk", h, q[i]))
        h = h + np.einsum("bthk,hkd->btd", t, o[i]) @ m[i] + bias[i]
    np.testing.assert_allclose(np.asarray(y), h, rtol=1e-4, atol=1e-4)

    frozen, adapters = jlora.split(tree)

    def merged_loss(ad):
        merged = jax.tree.map(
            lambda v: _np_merged(v, xp=jnp) if isinstance(v, jlora.LoraWeight) else v,
            jlora.combine(frozen, ad), is_leaf=lambda v: isinstance(v, jlora.LoraWeight),
        )  # fmt: skip
        return jnp.sum(apply(merged, x) ** 2)

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        g1 = jax.jit(
            jax.grad(lambda ad: jnp.sum(jlora.lora(apply)(jlora.combine(frozen, ad), x) ** 2))
        )(adapters)
    chex.assert_trees_all_close(g1, jax.jit(jax.grad(merged_loss))(adapters), rtol=1e-3, atol=1e-3)


def test_only_scanned_kernel_gets_per_layer_default_layout():
    """A kernel whose only use is entering a scan (unused in the body) still gets per-layer
    adapters, so the scan stays fused."""
    params = {"used": jnp.ones((3, 4, 4)), "unused": jnp.ones((3, 4, 6))}

    def apply(p, x):
        return jax.lax.scan(lambda h, ks: (h @ ks[0], None), x, (p["used"], p["unused"]))[0]

    x = jnp.ones((2, 4))
    tree = jlora.init(params, jlora.LoraConfig(rank=2, targets=".*"), key=jax.random.key(0),
                      apply=apply, args=(x,))  # fmt: skip
    assert (tree["unused"].batch_axes, tree["unused"].in_axes) == ((0,), (1,))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        jlora.lora(apply)(tree, x)
