"""QLoRA: int8 / NF4 frozen bases against independent numpy references, and in every fused rule."""

import dataclasses
import warnings
import zlib

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import jlora
from jlora import quant

RNG = np.random.default_rng(0)

# NF4 from the QLoRA paper (Dettmers et al. 2023, appendix E), written out independently.
PAPER_NF4 = [
    -1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453,
    -0.28444138169288635, -0.18477343022823334, -0.09105003625154495, 0.0,
    0.07958029955625534, 0.16093020141124725, 0.24611230194568634, 0.33791524171829224,
    0.44070982933044434, 0.5626170039176941, 0.7229568362236023, 1.0,
]  # fmt: skip


def _np_nf4(w, block=64):
    """float64 numpy reference: (codes, absmax, dequantized) of row-major blocks."""
    code = np.asarray(PAPER_NF4, np.float64)
    flat = np.asarray(w, np.float64).reshape(-1)
    n = flat.size
    flat = np.pad(flat, (0, -n % block)).reshape(-1, block)
    absmax = np.abs(flat).max(axis=1)
    normed = flat / np.where(absmax > 0, absmax, 1.0)[:, None]
    codes = np.abs(normed[..., None] - code).argmin(-1)  # nearest; a tie picks the lower code
    deq = (code[codes] * absmax[:, None]).reshape(-1)[:n].reshape(np.shape(w))
    return codes.reshape(-1)[:n], absmax, deq, normed.reshape(-1)[:n]


def _unpack(data):
    d = np.asarray(data).reshape(-1)
    return np.stack([d >> 4, d & 0xF], axis=-1).reshape(-1)


def test_code_book_matches_the_paper_and_the_normal_quantile_construction():
    np.testing.assert_array_equal(quant.NF4_CODE, np.asarray(PAPER_NF4, np.float32))
    # QLoRA's construction: quantiles of N(0, 1), 8 positive / 7 negative plus an exact zero.
    from scipy.stats import norm

    offset = 0.9677083
    pos = norm.ppf(np.linspace(offset, 0.5, 9)[:-1])
    neg = -norm.ppf(np.linspace(offset, 0.5, 8)[:-1])
    v = np.sort(np.concatenate([pos, [0.0], neg]))
    np.testing.assert_allclose(quant.NF4_CODE, v / np.abs(v).max(), atol=1e-6)


def test_nf4_exact_codes_and_packing_for_a_hand_made_block():
    # absmax 2: normalized 1, -1, 0.05 (> midpoint 0.0398 -> code 8), 0, 0.3 (-> 0.3379, code 11),
    # -0.6 (-> -0.5251, code 2), 0.64 (midpoint 0.6428 not reached -> 0.5626, code 13), 0.65 -> 14
    vals = np.zeros(64, np.float32)
    vals[:8] = np.array([1.0, -1.0, 0.05, 0.0, 0.3, -0.6, 0.64, 0.65]) * 2.0
    q = quant.NF4Weight.quantize(jnp.asarray(vals).reshape(4, 16))
    expected = [15, 0, 8, 7, 11, 2, 13, 14] + [7] * 56
    np.testing.assert_array_equal(_unpack(q.data), expected)
    assert [int(b) for b in np.asarray(q.data)[:4]] == [0xF0, 0x87, 0xB2, 0xDE]
    np.testing.assert_array_equal(np.asarray(q.absmax), [2.0])
    deq = np.asarray(q.dequantize()).reshape(-1)
    np.testing.assert_allclose(deq[:8], 2.0 * np.asarray(PAPER_NF4)[expected[:8]], rtol=1e-7)


@pytest.mark.parametrize("shape", [(128, 96), (7, 9), (3, 5, 40)])
def test_nf4_matches_numpy_reference_and_error_bound(shape):
    w = RNG.normal(size=shape).astype(np.float32) * 0.05
    q = quant.NF4Weight.quantize(jnp.asarray(w))
    assert q.shape == shape and q.dtype == jnp.float32 and q.data.dtype == jnp.uint8
    assert q.data.size == -(-np.prod(shape) // 64) * 32
    codes, absmax, deq, normed = _np_nf4(w)
    got = _unpack(q.data)[: codes.size]
    mids = (np.asarray(PAPER_NF4)[1:] + np.asarray(PAPER_NF4)[:-1]) / 2
    bad = got != codes
    # float32 vs float64 normalization may only disagree right at a decision boundary
    assert np.all(np.min(np.abs(normed[bad, None] - mids), axis=-1) < 1e-6)
    np.testing.assert_allclose(np.asarray(q.absmax), absmax, rtol=1e-6)
    np.testing.assert_allclose(np.asarray(q.dequantize()), deq, rtol=1e-5, atol=1e-7)
    # round-trip error: at most half the largest gap of the code book times the block absmax
    half_gap = np.diff(PAPER_NF4).max() / 2
    block_max = np.repeat(absmax, 64)[: w.size].reshape(shape)
    assert np.all(np.abs(np.asarray(q.dequantize()) - w) <= half_gap * block_max + 1e-7)


def test_nf4_double_quant_matches_numpy_reference():
    w = RNG.normal(size=(64 * 600,)).astype(np.float32).reshape(600, 64)  # 600 blocks: 3 dq blocks
    q = quant.NF4Weight.quantize(jnp.asarray(w), double_quant=True)
    assert q.double_quant and q.absmax.dtype == jnp.int8
    assert q.absmax_scale.shape == (3,) and q.absmax_offset.shape == (1,)
    absmax = np.abs(w.astype(np.float64)).max(axis=1)
    mean = absmax.mean()
    centred = np.pad(absmax - mean, (0, 168)).reshape(3, 256)
    scale = np.abs(centred).max(axis=1) / 127
    ref = (np.round(centred / scale[:, None]) * scale[:, None]).reshape(-1)[:600] + mean
    np.testing.assert_allclose(np.asarray(q.block_absmax()), ref, rtol=1e-5)
    assert np.all(
        np.abs(np.asarray(q.block_absmax()) - absmax) <= np.repeat(scale, 256)[:600] / 2 + 1e-6
    )
    single = quant.NF4Weight.quantize(jnp.asarray(w))
    rel = np.abs(np.asarray(q.dequantize()) - np.asarray(single.dequantize())).max()
    assert rel < 0.01 * np.abs(w).max()


def test_int8_matches_numpy_reference():
    w = RNG.normal(size=(3, 40, 24)).astype(np.float32)
    q = quant.Int8Weight.quantize(jnp.asarray(w), in_axes=(1,))
    assert q.data.dtype == jnp.int8 and q.scale.shape == (3, 1, 24)
    absmax = np.abs(w.astype(np.float64)).max(axis=1, keepdims=True)
    ref_codes = np.clip(np.round(w / (absmax / 127)), -127, 127)
    diff = np.abs(np.asarray(q.data, np.int64) - ref_codes)
    assert diff.max() <= 1 and (diff > 0).mean() < 1e-3  # only exact .5 ties may round apart
    assert np.all(np.abs(np.asarray(q.dequantize()) - w) <= absmax / 127 * 0.5 + 1e-6)
    assert np.all(np.abs(np.asarray(q.data)).max(axis=1) == 127)


def test_dequantize_dtype_and_astype():
    w = jnp.asarray(RNG.normal(size=(64, 8)), jnp.bfloat16)
    for q in (quant.NF4Weight.quantize(w), quant.Int8Weight.quantize(w)):
        assert q.dtype == jnp.bfloat16 and q.dequantize().dtype == jnp.bfloat16
        assert q.dequantize(jnp.float32).dtype == jnp.float32
        q32 = q.astype(jnp.float32)
        assert type(q32) is type(q) and q32.dtype == jnp.float32
        chex.assert_trees_all_close(q32.dequantize().astype(jnp.bfloat16), q.dequantize())


def _lora_tree(params, cfg, seed=1):
    tree = jlora.init(params, cfg, key=jax.random.key(seed))

    def rnd(path, x):
        if isinstance(x, jlora.LoraWeight):
            k = jax.random.fold_in(
                jax.random.key(seed + 1), zlib.crc32(jlora.path_str(path).encode()) % 1000
            )
            return dataclasses.replace(x, b=0.1 * jax.random.normal(k, x.b.shape, x.b.dtype))
        return x

    return jax.tree_util.tree_map_with_path(rnd, tree, is_leaf=jlora.extend.is_node)


def _f64(x):
    return np.asarray(x, np.float64)


@pytest.mark.usefixtures("np_ref_attr")
class QuantFusedTest(chex.TestCase):
    """Each fused rule with a quantized W == a float64 numpy forward with W dequantized from its
    codes (int8 ``data·scale``, NF4 through the code book) and ``+ s·a@b`` (`np_ref.merged`)."""

    def _check(self, fn, qtree, *args, ref, tol=2e-4):
        with warnings.catch_warnings():
            warnings.simplefilter("error")  # no fallback that materializes the kernel
            out = self.variant(jlora.lora(fn))(qtree, *args)
        chex.assert_trees_all_close(out, ref, rtol=tol, atol=tol)
        return out

    @chex.variants(with_jit=True, without_jit=True)
    def test_dense_nf4_and_int8(self):
        m = nn.Dense(48)
        x = jnp.asarray(RNG.normal(size=(2, 5, 64)), jnp.float32)
        p = m.init(jax.random.key(0), x)["params"]
        tree = _lora_tree(p, jlora.LoraConfig(rank=4))
        for method in ("nf4", "int8"):
            q = quant.quantize(tree, method=method)
            ref = _f64(x) @ self.np_ref.merged(q["kernel"]) + _f64(p["bias"])
            self._check(lambda p, x: m.apply({"params": p}, x), q, x, ref=ref)

    @chex.variants(with_jit=True, without_jit=True)
    def test_conv(self):
        m = nn.Conv(8, (3, 3), use_bias=False)  # padding SAME: one pixel on each side
        x = jnp.asarray(RNG.normal(size=(2, 6, 6, 4)), jnp.float32)
        p = m.init(jax.random.key(0), x)["params"]
        q = quant.quantize(_lora_tree(p, jlora.LoraConfig(rank=2)), method="nf4", double_quant=True)
        k = self.np_ref.merged(q["kernel"])  # (3, 3, 4, 8)
        padded = np.pad(_f64(x), ((0, 0), (1, 1), (1, 1), (0, 0)))
        win = np.lib.stride_tricks.sliding_window_view(padded, (3, 3), axis=(1, 2))
        ref = np.einsum("bhwcij,ijco->bhwo", win, k)
        self._check(lambda p, x: m.apply({"params": p}, x), q, x, ref=ref)

    @chex.variants(with_jit=True, without_jit=True)
    def test_embedding_lookup_and_attend(self):
        m = nn.Embed(40, 16)
        ids = jnp.array([[1, 5, 39], [0, 2, 2]])
        p = m.init(jax.random.key(0), ids)["params"]
        cfg = jlora.LoraConfig(rank=2, targets=["embedding"])
        tree = jlora.init(p, cfg, key=jax.random.key(1))  # embedding: A = 0, B ~ N(0, 1)
        tree = {"embedding": dataclasses.replace(tree["embedding"], a=0.1 * jnp.ones((40, 2)))}
        q = quant.quantize(tree, method="int8")

        def f(p, ids):
            h = m.apply({"params": p}, ids)
            return h, m.apply({"params": p}, h, method=m.attend)

        table = self.np_ref.merged(q["embedding"])
        h = table[np.asarray(ids)]
        self._check(f, q, ids, ref=(h, h @ table.T))

    @chex.variants(with_jit=True, without_jit=True)
    def test_transpose_and_convert_to_bf16(self):
        x = jnp.asarray(RNG.normal(size=(4, 64)), jnp.float32)
        p = {"k": jnp.asarray(RNG.normal(size=(32, 64)), jnp.float32)}  # used as x @ k.T
        cfg = jlora.LoraConfig(rank=2, targets="k")
        q = quant.quantize(_lora_tree(p, cfg), method="nf4")

        def f(p, x):
            w = jnp.transpose(p["k"])  # transpose rule
            return (x.astype(jnp.bfloat16) @ w.astype(jnp.bfloat16)).astype(jnp.float32)

        self._check(f, q, x, ref=_f64(x) @ self.np_ref.merged(q["k"]).T, tol=0.1)

    @chex.variants(with_jit=True, without_jit=True)
    def test_scan_over_stacked_quantized_kernels(self):
        class Block(nn.Module):
            @nn.compact
            def __call__(self, h, _):
                return jnp.tanh(nn.Dense(32, use_bias=False)(h)), None

        model = nn.scan(Block, variable_axes={"params": 0}, split_rngs={"params": True}, length=3)()
        x = jnp.asarray(RNG.normal(size=(2, 32)), jnp.float32)
        p = model.init(jax.random.key(0), x, None)["params"]
        cfg = jlora.LoraConfig(rank=2, axes_pattern={"kernel": ((0,), (1,))})
        tree = _lora_tree(p, cfg)
        for method in ("nf4", "int8"):
            q = quant.quantize(tree, method=method, double_quant=method == "nf4")
            w = q["Dense_0"]["kernel"].w
            assert w.shape == (3, 32, 32)
            if method == "nf4":  # per-layer blocks: leading axis kept, so scan slices it right
                assert w.data.shape == (3, 512) and w.absmax.shape == (3, 16)
                one = quant.NF4Weight.quantize(p["Dense_0"]["kernel"][1], double_quant=True)
                chex.assert_trees_all_close(w.dequantize()[1], one.dequantize())
            k = self.np_ref.merged(q["Dense_0"]["kernel"])  # (layers, in, out)
            h = _f64(x)
            for layer in range(3):
                h = np.tanh(h @ k[layer])
            self._check(lambda p, x: model.apply({"params": p}, x, None)[0], q, x, ref=h)


def test_numpy_dequantize_reference_agrees_with_the_nodes(np_ref):
    """The float64 references used above read the codes the way the nodes do."""
    w = jnp.asarray(RNG.normal(size=(3, 40, 24)), jnp.float32)
    quantizers = (
        lambda w: quant.Int8Weight.quantize(w, in_axes=(1,)),
        lambda w: quant.NF4Weight.quantize(w),  # 45 blocks, across the leading axis
        lambda w: quant.NF4Weight.quantize(w, lead=1, double_quant=True, dq_block_size=4),
    )
    for quantize in quantizers:
        q = jax.jit(quantize)(w)  # one compile instead of one per eager op
        ref = np_ref.dequantize(q)
        assert ref.dtype == np.float64 and ref.shape == w.shape
        got = jax.jit(lambda q: q.dequantize())(q)
        np.testing.assert_allclose(ref, np.asarray(got), rtol=1e-6, atol=1e-7)
        assert np.abs(ref - _f64(w)).max() < 0.2 * np.abs(_f64(w)).max()


@pytest.mark.usefixtures("np_ref_attr")
class QuantTransformTest(chex.TestCase):
    """merge and grad over quantized kernels, eager and under `jax.jit`, against numpy."""

    @chex.variants(with_jit=True, without_jit=True)
    def test_merge_dequantizes_merges_in_fp32_and_returns_plain_arrays(self):
        p = {"d": {"kernel": jnp.asarray(RNG.normal(size=(64, 32)), jnp.bfloat16)}}
        tree = _lora_tree(p, jlora.LoraConfig(rank=3, alpha=6))
        q = quant.quantize(tree, method="nf4", double_quant=True)
        merged = self.variant(jlora.merge)(q)["d"]["kernel"]
        assert isinstance(merged, jax.Array) and merged.dtype == jnp.bfloat16
        lw = q["d"]["kernel"]
        ref = self.np_ref.dequantize(lw.w) + 2.0 * (_f64(lw.a) @ _f64(lw.b))
        np.testing.assert_allclose(np.asarray(merged, np.float64), ref, rtol=1e-2, atol=1e-2)
        deq = self.variant(jlora.quant.dequantize)(q)
        assert self.variant(jlora.merge)(deq)["d"]["kernel"].dtype == jnp.bfloat16

    @chex.variants(with_jit=True, without_jit=True)
    def test_gradients_flow_to_adapters_only_and_match_dequantized_reference(self):
        m = nn.Dense(16, use_bias=False)
        x = jnp.asarray(RNG.normal(size=(4, 64)), jnp.float32)
        p = m.init(jax.random.key(0), x)["params"]
        q = quant.quantize(_lora_tree(p, jlora.LoraConfig(rank=2)))
        deq = jax.tree.map(
            lambda v: (
                dataclasses.replace(v, w=v.w.dequantize()) if isinstance(v, jlora.LoraWeight) else v
            ),
            q,
            is_leaf=jlora.extend.is_node,
        )
        f = jlora.lora(lambda p, x: jnp.sum(m.apply({"params": p}, x) ** 2))
        frozen, train = jlora.split(q)
        g = self.variant(jax.grad(lambda t: f(jlora.combine(frozen, t), x)))(train)
        g_deq = jax.grad(lambda t: f(jlora.combine(jlora.split(deq)[0], t), x))(jlora.split(deq)[1])
        chex.assert_trees_all_close(g, g_deq, rtol=1e-5, atol=1e-5)
        # float64 numpy: L = sum((x M)^2), M = deq(W) + s·a@b; dM = xᵀ·2xM
        lw = q["kernel"]
        x64 = _f64(x)
        dm = x64.T @ (2 * x64 @ self.np_ref.merged(lw))
        np.testing.assert_allclose(
            g["kernel"].a, lw.scale * dm @ _f64(lw.b).T, rtol=1e-4, atol=1e-4
        )
        np.testing.assert_allclose(
            g["kernel"].b, lw.scale * _f64(lw.a).T @ dm, rtol=1e-4, atol=1e-4
        )
        assert g["kernel"].w is None  # the frozen (quantized) half gets no gradient


def test_byte_ratios():
    p = {"d": {"kernel": jnp.asarray(RNG.normal(size=(512, 256)), jnp.bfloat16)}}
    tree = jlora.init(p, jlora.LoraConfig(rank=4), key=jax.random.key(0))
    bf16 = quant.nbytes(jlora.split(tree)[0])
    assert bf16 == 512 * 256 * 2
    nf4 = quant.nbytes(jlora.split(quant.quantize(tree))[0]) / bf16
    dq = quant.nbytes(jlora.split(quant.quantize(tree, double_quant=True))[0]) / bf16
    i8 = quant.nbytes(jlora.split(quant.quantize(tree, method="int8"))[0]) / bf16
    assert nf4 == pytest.approx((4 + 32 / 64) / 16)  # 4.5 bits per parameter
    assert dq == pytest.approx((4 + 8 / 64 + 32 / (64 * 256) + 32 / (512 * 256)) / 16)
    assert i8 == pytest.approx((8 + 32 / 512) / 16)


def test_plain_kernels_selected_by_targets_stay_bare_quantized_nodes(tmp_path, np_ref):
    m = nn.Sequential([nn.Dense(32), nn.relu, nn.Dense(8)])
    x = jnp.asarray(RNG.normal(size=(3, 16)), jnp.float32)
    p = m.init(jax.random.key(0), x)["params"]
    cfg = jlora.LoraConfig(rank=2, targets=["layers_0"])
    tree = _lora_tree(p, cfg)
    q = quant.quantize(tree, targets=r"kernel")
    assert isinstance(q["layers_2"]["kernel"], quant.NF4Weight)  # no adapter: a bare node
    assert isinstance(q["layers_0"]["kernel"].w, quant.NF4Weight)
    f = jlora.lora(lambda p, x: m.apply({"params": p}, x))
    merged = jlora.merge(q)
    assert isinstance(merged["layers_2"]["kernel"], jax.Array)
    np.testing.assert_allclose(merged["layers_2"]["kernel"], q["layers_2"]["kernel"].dequantize())
    w2 = np_ref.dequantize(q["layers_2"]["kernel"])  # the bare node, from its codes
    np.testing.assert_allclose(merged["layers_2"]["kernel"], w2, rtol=1e-6, atol=1e-7)
    # float64 numpy forward: relu(x (W0 + s·a@b) + b0) W2 + b2
    h = np.maximum(
        _f64(x) @ np_ref.merged(q["layers_0"]["kernel"]) + _f64(p["layers_0"]["bias"]), 0
    )
    ref = h @ w2 + _f64(p["layers_2"]["bias"])
    chex.assert_trees_all_close(m.apply({"params": merged}, x), ref, atol=1e-4)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        chex.assert_trees_all_close(jax.jit(f)(q, x), ref, atol=1e-4)
        chex.assert_trees_all_close(f(q, x), ref, atol=1e-4)
    s, s0 = jlora.summary(q), jlora.summary(tree)
    assert (s.trainable, s.base, s.targets) == (s0.trainable, s0.base, s0.targets)
    frozen, train = jlora.split(q)
    assert train["layers_2"]["kernel"].data is None
    assert jlora.combine(frozen, train)["layers_2"]["kernel"].data is q["layers_2"]["kernel"].data
    back = jlora.unmerge(merged, q)
    assert back["layers_2"]["kernel"] is q["layers_2"]["kernel"]
    jlora.peft.save(tmp_path, q, cfg)  # only the real adapter is written
    loaded, _ = jlora.peft.load(tmp_path, p)
    chex.assert_trees_all_close(loaded["layers_0"]["kernel"].b, tree["layers_0"]["kernel"].b)


@pytest.mark.slow
def test_qlora_training_tracks_lora():
    """A short run on a fixed regression task: QLoRA's final loss is close to LoRA's."""
    m = nn.Sequential([nn.Dense(128), nn.gelu, nn.Dense(128), nn.gelu, nn.Dense(8)])
    x = jnp.asarray(RNG.normal(size=(64, 32)), jnp.float32)
    p = m.init(jax.random.key(0), x)["params"]
    y = jnp.sin(x[:, :8] * 2.0)
    cfg = jlora.LoraConfig(rank=8, alpha=16)
    tree = jlora.init(p, cfg, key=jax.random.key(1))

    def run(t):
        frozen, train = jlora.split(t)
        tx = optax.adam(3e-3)
        f = jlora.lora(lambda p, x: m.apply({"params": p}, x))

        def loss(tr):
            return jnp.mean((f(jlora.combine(frozen, tr), x) - y) ** 2)

        @jax.jit
        def step(tr, s):
            lv, g = jax.value_and_grad(loss)(tr)
            u, s = tx.update(g, s, tr)
            return optax.apply_updates(tr, u), s, lv

        s = tx.init(train)
        for _ in range(150):
            train, s, lv = step(train, s)
        return float(loss(train)), float(lv)

    lora_loss, _ = run(tree)
    qlora_loss, _ = run(quant.quantize(tree, method="nf4", double_quant=True))
    start = float(jnp.mean((m.apply({"params": p}, x) - y) ** 2))
    assert lora_loss < 0.5 * start and qlora_loss < 0.5 * start
    assert abs(qlora_loss - lora_loss) < 0.25 * lora_loss + 1e-3


def test_errors():
    p = {"d": {"kernel": jnp.ones((64, 8)), "bias": jnp.ones(8)}}
    tree = jlora.init(p, jlora.LoraConfig(rank=2), key=jax.random.key(0))
    with pytest.raises(ValueError, match=r"`method` must be one of \('nf4', 'int8'\), got 'fp4'"):
        quant.quantize(tree, method="fp4")
    with pytest.raises(ValueError, match=r"`double_quant=True` applies to method='nf4' only"):
        quant.quantize(tree, method="int8", double_quant=True)
    with pytest.raises(ValueError, match=r"`block_size` must be a positive even integer, got 63"):
        quant.quantize(tree, block_size=63)
    with pytest.raises(ValueError, match=r"`targets` '\(' is not a valid regex"):
        quant.quantize(tree, targets="(")
    with pytest.raises(TypeError, match=r"`targets` must be a regex string or None"):
        quant.quantize(tree, targets=["d"])
    with pytest.raises(
        ValueError,
        match=r"nothing to quantize: no LoraWeight kernel or leaf matched targets='nope'",
    ):
        quant.quantize(tree, targets="nope")
    with pytest.raises(ValueError, match=r"nothing to quantize: no LoraWeight kernel matched"):
        quant.quantize(p)
    with pytest.raises(
        ValueError, match=r"the kernel at d/kernel with shape \(64, 8\) is already quantized"
    ):
        quant.quantize(quant.quantize(tree))
    bare = quant.quantize(p, targets="kernel", method="int8")
    with pytest.raises(ValueError, match=r"the kernel at d/kernel with shape \(64, 8\) is already"):
        quant.quantize(bare, targets="kernel")
    bad = {"k": jlora.LoraWeight(jnp.ones((4, 4), jnp.int32), jnp.ones((4, 1)), jnp.ones((1, 4)))}
    with pytest.raises(
        TypeError, match=r"cannot quantize k: it has dtype int32 and shape \(4, 4\)"
    ):
        quant.quantize(bad)
    sliced = quant.NF4Weight.quantize(jnp.ones((64,)))
    sliced = dataclasses.replace(sliced, data=sliced.data[0], absmax=sliced.absmax[0])
    with pytest.raises(
        ValueError, match=r"NF4Weight with tail shape \(64,\) was sliced along its packed axis"
    ):
        sliced.dequantize()


def test_quantize_under_jit():
    p = {"d": {"kernel": jnp.asarray(RNG.normal(size=(64, 16)), jnp.float32)}}
    tree = jlora.init(p, jlora.LoraConfig(rank=2), key=jax.random.key(0))
    eager = quant.quantize(tree, double_quant=True)
    jitted = jax.jit(lambda t: quant.quantize(t, double_quant=True))(tree)
    chex.assert_trees_all_close(eager, jitted)
