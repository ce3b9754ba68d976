"""Packed classification batches (`jlora.train.data.packing`, ``data.packing`` on a classification
run): several texts per row, each still its own example — logits, loss and gradients equal the
unpacked batch's."""

from __future__ import annotations

import dataclasses
import json
import random

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
from jlora.train.data.packing import pack_micro_batches, pack_rows, packing_of, slots_per_row
from jlora.train.engine.setup import prepare
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
    cfg = C.from_dict(_raw(data_dir, tmp_path, packing=True))
    p = prepare(cfg)
    pack = packing_of(cfg, p.splits["train"])
    lengths = p.splits["train"].attention_mask.sum(-1)
    assert pack == {"row_len": 16, "slots": 16 // int(lengths.min())}
    plain = train(C.from_dict(_raw(data_dir, tmp_path / "plain")), echo=lambda s: None)
    packed = train(cfg, echo=lambda s: None)
    # the same texts in every step: the same losses and adapters, up to float round-off
    for split in ("validation", "test"):
        for k in ("loss", "accuracy"):
            assert packed["after"][split][k] == pytest.approx(plain["after"][split][k], abs=1e-4)
    tokens_plain = sum(
        D.train_batch(p.splits["train"], p.batcher, s, 1)["attention_mask"].sum() for s in range(4)
    )
    assert packed["tokens_per_s"] * packed["train_time_s"] == pytest.approx(tokens_plain)
