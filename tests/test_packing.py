"""Packed classification batches (`jlora.train.data.packing`, ``data.packing`` on a classification
run): several texts per row, each still its own example — logits, loss and gradients equal the
unpacked batch's; packed evaluation (one batch shape) equals the unpacked one; the train-batch
sizes planned for a run (``data.train_shapes``, `jlora.train.data.shapes`) and compiled ahead."""

from __future__ import annotations

import dataclasses
import itertools
import json
import random
import types

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jlora
import jlora.train.data as D
from jlora.interop.models.bert import BertConfig, BertModel
from jlora.train import config as C
from jlora.train import train
from jlora.train.data.packing import (
    eval_packing_of,
    pack_micro_batches,
    pack_rows,
    pack_split,
    packing_of,
    slots_per_row,
)
from jlora.train.data.shapes import padded_units, plan_sizes, planned
from jlora.train.engine.compiles import CompileCounter
from jlora.train.engine.phases import compile_train, set_up
from jlora.train.engine.setup import prepare
from jlora.train.engine.steps import make_eval_step, step_key
from jlora.train.objectives import Classification

WORDS = ["[PAD]", "[UNK]", "red", "blue", "cat", "dog", "bird", "one", "two", "big", "small"]
BERT = dict(
    vocab_size=len(WORDS),
    hidden_size=16,
    num_hidden_layers=1,
    num_attention_heads=2,
    intermediate_size=32,
    max_position_embeddings=32,
)


def _texts(n: int, seed: int, lo: int = 2, hi: int = 9):
    rng = np.random.default_rng(seed)
    lengths = rng.integers(lo, hi, n)
    ids = np.zeros((n, hi), np.int32)
    for i, k in enumerate(lengths):
        ids[i, :k] = rng.integers(2, len(WORDS), k)
    mask = (np.arange(hi)[None] < lengths[:, None]).astype(np.int32)
    return {"input_ids": ids, "attention_mask": mask, "labels": rng.integers(0, 3, n)}


def _lora_tree(seed: int = 0):
    """A tiny BERT with a 3-way head and LoRA (non-zero B) on every attention projection."""
    model = BertModel(BertConfig(**BERT, num_labels=3))
    params = model.init(jax.random.key(seed), jnp.ones((1, 4), jnp.int32))["params"]
    cfg = jlora.LoraConfig(rank=2, targets=["query", "key", "value", "attention/output/dense"])
    tree = jlora.init(params, cfg, key=jax.random.key(1))

    def bump(x):  # B != 0, so the adapters change the output
        if isinstance(x, jlora.LoraWeight):
            return dataclasses.replace(x, b=0.3 * jax.random.normal(jax.random.key(2), x.b.shape))
        return x

    return model, jax.tree.map(bump, tree, is_leaf=lambda x: isinstance(x, jlora.LoraWeight))


def test_pack_rows_puts_every_text_in_exactly_one_row():
    rng = np.random.default_rng(0)
    lengths = rng.integers(1, 20, 200)
    rows = pack_rows(lengths, 24)
    assert sorted(i for r in rows for i in r) == list(range(200))
    assert all(sum(lengths[r]) <= 24 for r in rows)
    # first-fit-decreasing is within 11/9 OPT + 1 rows; OPT >= total / row length
    assert len(rows) <= 11 / 9 * np.ceil(lengths.sum() / 24) + 1
    with pytest.raises(ValueError, match="a text of 30 tokens exceeds rows of 24"):
        pack_rows([3, 30], 24)


def test_pack_micro_batches_keeps_tokens_labels_and_slots():
    part = _texts(32, seed=1)
    slots = slots_per_row(part["attention_mask"].sum(-1), 16, 32)
    assert slots == 16 // 2
    b = pack_micro_batches([part, _texts(32, seed=2)], row_len=16, slots=slots)
    rows = b["input_ids"].shape[1]
    assert b["input_ids"].shape == (2, rows, 16) and b["labels"].shape == (2, rows, slots)
    assert b["weight"][0].sum() == 32 and b["weight"][1].sum() == 32
    # every text appears once, its tokens contiguous under one segment id
    got = []
    for r in range(rows):
        for k in range(slots):
            if b["weight"][0, r, k]:
                toks = b["input_ids"][0, r][b["segment_ids"][0, r] == k + 1]
                got.append((tuple(toks.tolist()), int(b["labels"][0, r, k])))
    want = [
        (
            tuple(part["input_ids"][i, : part["attention_mask"][i].sum()].tolist()),
            int(part["labels"][i]),
        )
        for i in range(32)
    ]
    assert sorted(got) == sorted(want)
    assert (b["attention_mask"] == (b["segment_ids"] > 0)).all()


class PackedForwardTest(chex.TestCase):
    @chex.variants(with_jit=True, without_jit=True)
    def test_packed_logits_equal_each_text_alone(self):
        model, tree = _lora_tree()
        part = _texts(8, seed=3)
        b = pack_micro_batches([part], row_len=24, slots=8)
        packed = {k: v[0] for k, v in b.items()}

        @self.variant
        def fwd(tree, ids, mask, seg=None):
            kw = {} if seg is None else {"segment_ids": seg, "num_segments": 8}
            return jlora.lora(model.apply)({"params": tree}, ids, attention_mask=mask, **kw).logits

        got = fwd(tree, packed["input_ids"], packed["attention_mask"], packed["segment_ids"])
        alone = np.asarray(fwd(tree, part["input_ids"], part["attention_mask"]))
        assert np.asarray(got).shape == (*packed["labels"].shape, 3)
        order = np.argsort(-part["attention_mask"].sum(-1), kind="stable")
        rows = pack_rows(part["attention_mask"].sum(-1), 24)
        assert sorted(i for r in rows for i in r) == sorted(order.tolist())
        for r, texts in enumerate(rows):
            for k, i in enumerate(texts):
                chex.assert_trees_all_close(np.asarray(got)[r, k], alone[i], atol=1e-5, rtol=1e-5)


def test_packed_loss_and_gradients_equal_the_unpacked_batch():
    model, tree = _lora_tree(seed=4)
    task = Classification(model)
    part = _texts(20, seed=5)
    packed = {k: v[0] for k, v in pack_micro_batches([part], row_len=20, slots=10).items()}
    frozen, adapters = jlora.split(tree)

    def mean_loss(ad, batch):
        t = task.terms(jlora.combine(frozen, ad), batch)
        return t["loss"] / t["weight"], t

    grad = jax.jit(jax.value_and_grad(mean_loss, has_aux=True))
    (l_packed, t_packed), g_packed = grad(adapters, packed)
    (l_plain, t_plain), g_plain = grad(adapters, part)
    assert float(t_packed["weight"]) == 20.0 == float(t_plain["weight"])
    assert float(t_packed["correct"]) == float(t_plain["correct"])
    chex.assert_trees_all_close(l_packed, l_plain, atol=1e-6, rtol=1e-6)
    chex.assert_trees_all_close(g_packed, g_plain, atol=1e-6, rtol=1e-5)


def test_segment_ids_need_num_segments():
    model, tree = _lora_tree()
    ids = jnp.ones((1, 4), jnp.int32)
    with pytest.raises(ValueError, match="segment_ids and num_segments go together"):
        jlora.lora(model.apply)({"params": tree}, ids, segment_ids=jnp.ones((1, 4), jnp.int32))


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    from tokenizers import Tokenizer
    from tokenizers.models import WordLevel
    from tokenizers.pre_tokenizers import Whitespace

    root = tmp_path_factory.mktemp("packing")
    tok = Tokenizer(WordLevel({w: i for i, w in enumerate(WORDS)}, unk_token="[UNK]"))
    tok.pre_tokenizer = Whitespace()
    tok.save(str(root / "tokenizer.json"))
    rng = random.Random(0)
    for split, n in (("train", 48), ("validation", 8), ("test", 8)):
        rows = []
        for _ in range(n):
            y = rng.randrange(2)  # the label's word is in the text
            words = [*rng.choices(WORDS[4:], k=rng.randint(1, 6)), WORDS[2 + y]]
            rows.append({"text": " ".join(words), "label": y})
        (root / f"{split}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (root / "labels.json").write_text(json.dumps(["red", "blue"]))
    return root


def _raw(data_dir, tmp_path, **data):
    return {
        "name": "packed",
        "model": {
            "random": {"model_type": "bert", **BERT},
            "task": "classification",
            "num_labels": 2,
            "dropout": False,
        },
        "data": {
            "path": str(data_dir),
            "tokenizer": str(data_dir / "tokenizer.json"),
            "batch_size": 8,
            "eval_batch_size": 8,
            "max_len": 16,
            **data,
        },
        "lora": {"rank": 2, "targets": ["query", "value"], "trainable": ["classifier"]},
        "optim": {"lr": 0.05},
        "train": {"max_steps": 4, "eval_every": 4, "log_every": 1},
        "checkpoint": {"enabled": False},
        "output": {"dir": str(tmp_path / "run"), "progress": False, "tensorboard": False},
    }


@pytest.mark.slow
def test_a_packed_run_trains_the_same_steps_as_an_unpacked_one(data_dir, tmp_path):
    cfg = C.from_dict(_raw(data_dir, tmp_path, packing=True, train_shapes=1))
    p = prepare(cfg)
    pack = packing_of(cfg, p.splits["train"])
    lengths = p.splits["train"].attention_mask.sum(-1)
    assert pack == {"row_len": 16, "slots": 16 // int(lengths.min())}
    plain = train(C.from_dict(_raw(data_dir, tmp_path / "plain")), echo=lambda s: None)
    packed = train(cfg, echo=lambda s: None)  # padded to one row count, compiled ahead
    phases = {"setup_s", "train_s", "eval_s", "after_eval_s", "export_s", "compile_wait_s"}
    assert phases <= set(packed["timings_s"]) and set(packed["timings_s"]) == set(
        packed["cpu_timings_s"]
    )
    assert sum(packed["timings_s"].values()) <= packed["wall_time_s"]
    # the same texts in every step: the same losses and adapters, up to float round-off
    for split in ("validation", "test"):
        for k in ("loss", "accuracy"):
            assert packed["after"][split][k] == pytest.approx(plain["after"][split][k], abs=1e-4)
    tokens_plain = sum(
        D.train_batch(p.splits["train"], p.batcher, s, 1)["attention_mask"].sum() for s in range(4)
    )
    assert packed["tokens_per_s"] * packed["train_time_s"] == pytest.approx(tokens_plain)


# --- packed evaluation ------------------------------------------------------------------------


def _split_of(part: dict) -> D.Split:
    return D.Split(part["input_ids"], part["attention_mask"], part["labels"])


def _data_cfg(**data):
    base = dict(packing=False, max_len=9, eval_batch_size=8, length_buckets=None)
    return types.SimpleNamespace(data=types.SimpleNamespace(**{**base, **data}))


def test_pack_split_covers_the_split_once_in_one_shape():
    split = _split_of(_texts(41, seed=6))
    pack = eval_packing_of(_data_cfg(packing=True), split)
    assert pack == {"row_len": 9, "slots": 9, "rows": 4}  # 8 texts of 4 tokens fill 4 rows of 9
    batches = list(pack_split(split, **pack))
    assert {b["input_ids"].shape for b in batches} == {(4, 9)}
    seen = []
    for b in batches:
        for r, k in zip(*np.nonzero(b["weight"]), strict=True):
            i = int(b["index"][r, k])
            seen.append(i)
            toks = b["input_ids"][r][b["segment_ids"][r] == k + 1]
            n = int(split.attention_mask[i].sum())
            np.testing.assert_array_equal(toks, split.input_ids[i, :n])
            assert b["labels"][r, k] == split.labels[i]
        assert (b["index"][b["weight"] == 0] == -1).all()
    assert sorted(seen) == list(range(41))
    assert eval_packing_of(_data_cfg(), split) is None
    with pytest.raises(ValueError, match="texts in one row, only 1 slots"):
        list(pack_split(split, row_len=9, slots=1, rows=4))


@pytest.mark.slow  # ~9-35 s (a BERT eval program, packed and plain)
def test_packed_evaluation_equals_the_unpacked_one():
    """Metrics and each text's pooled features: packed batches of one shape = plain batches."""
    model, tree = _lora_tree(seed=5)
    task = Classification(model)
    frozen, adapters = jlora.split(tree)
    step = jax.jit(make_eval_step(task))
    split = _split_of(_texts(29, seed=8))
    got = task.evaluate(
        lambda b: step(adapters, frozen, b), split, _data_cfg(packing=True), features=True
    )
    want = task.evaluate(lambda b: step(adapters, frozen, b), split, _data_cfg(), features=True)
    for k in ("loss", "accuracy"):
        assert got[0][k] == pytest.approx(want[0][k], abs=1e-6)
    chex.assert_trees_all_close(got[1], want[1], atol=1e-5, rtol=1e-5)
    assert step._cache_size() == 2  # one packed shape; the plain batches all trim to 8 tokens


# --- planned train shapes -------------------------------------------------------------------


def test_plan_sizes_is_the_least_padding_of_at_most_k_sizes():
    rng = random.Random(0)
    for _ in range(200):
        sizes = [rng.randint(1, 12) for _ in range(rng.randint(1, 25))]
        values = sorted(set(sizes))
        for most in (1, 2, 3):
            got = plan_sizes(sizes, most)
            assert len(got) <= most and max(values) in got
            # brute force: every set of at most `most` sizes holding the largest
            best = min(
                sum(min(c for c in combo if c >= s) for s in sizes)
                for k in range(1, most + 1)
                for combo in itertools.combinations(values, k)
                if max(values) in combo
            )
            assert padded_units(sizes, got) == best
    assert plan_sizes([10, 11, 12, 14], 1) == (14,) and planned(15, (12, 14)) == 15
    with pytest.raises(ValueError, match=r"data\.train_shapes must be >= 1, got 0"):
        plan_sizes([3], 0)


def test_train_batch_pads_up_to_the_planned_length():
    lengths = [3, 12, 17, 40, 9, 30, 2, 16]
    mask = (np.arange(48)[None] < np.asarray(lengths)[:, None]).astype(np.int32)
    split = D.Split(mask * 5, mask, np.arange(8) % 2)
    batcher = D.Batcher(8, 2, seed=0)
    want = [D.step_length(split, batcher, s, 1) for s in range(4)]
    plan = plan_sizes(want, 2)
    for s in range(4):
        plain = D.train_batch(split, batcher, s, 1)
        b = D.train_batch(split, batcher, s, 1, sizes=plan)
        assert plain["input_ids"].shape[-1] == want[s]
        assert (
            b["input_ids"].shape[-1] == planned(want[s], plan) and b["input_ids"].shape[-1] in plan
        )
        np.testing.assert_array_equal(b["attention_mask"][..., : want[s]], plain["attention_mask"])
        assert b["attention_mask"][..., want[s] :].sum() == 0


@pytest.mark.slow  # ~14 s (two prepared runs)
def test_planned_packed_batches_hold_the_same_texts(data_dir, tmp_path):
    p = prepare(C.from_dict(_raw(data_dir, tmp_path, packing=True, train_shapes=1)))
    plain = prepare(C.from_dict(_raw(data_dir, tmp_path, packing=True)))
    steps = range(p.total_steps + 1)  # a step past the end is computed ahead of the last save
    rows = plain.objective.train_sizes(plain, steps)
    assert plain.train_plan is None and len(set(rows)) > 1
    assert p.train_plan == (max(rows),) and p.plan_steps == (0,)  # every step: the one size
    for s in steps:
        b, b0 = p.objective.train_batch(p, s), plain.objective.train_batch(plain, s)
        n = b0["input_ids"].shape[1]
        assert n == rows[s] and b["input_ids"].shape[1] == max(rows)
        for k in b0:
            np.testing.assert_array_equal(b[k][:, :n], b0[k])
            assert not b[k][:, n:].any()  # the added rows are empty: weight 0


@pytest.mark.slow  # ~17-26 s (a set-up run, its train program)
def test_train_programs_compiled_ahead_are_the_ones_the_steps_run(data_dir, tmp_path):
    cfg = C.from_dict(_raw(data_dir, tmp_path, packing=True, train_shapes=1))
    run = set_up(cfg, resume=False, echo=lambda s: None)
    try:
        p = run.p
        assert len(p.train_plan) == 1 == len(p.plan_steps)
        compile_train(run)
        run.compiling.wait()
        args = [(p.objective.train_batch(p, s, run), step_key(0, s)) for s in p.plan_steps]
        with CompileCounter() as c:
            for batch, key in args:
                jax.block_until_ready(
                    run.train_step(run.adapters, run.opt_state, run.frozen, batch, key)
                )
        assert c.programs == 0
        assert run.train_step._cache_size() == 1
    finally:
        run.lock.release()
