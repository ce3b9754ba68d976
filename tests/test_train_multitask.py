"""Multitask runs of `jlora train` (``data.tasks``): config checks, task mixing, the mixed loss,
and whole tiny runs with one adapter per task and with one shared adapter."""

from __future__ import annotations

import dataclasses
import json
import random

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from _hf_utils import require, tiny_bert

import jlora
import jlora.train.data as D
from jlora.train import config as C
from jlora.train import train
from jlora.train.engine.setup import base_tree, prepare
from jlora.train.engine.steps import make_optimizer, make_schedule, make_train_step
from jlora.train.io.export import from_checkpoint
from jlora.train.objectives import CausalLM, Classification
from jlora.train.objectives.multitask_io import task_trees

WORDS = ["red", "blue", "green", "cat", "dog", "bird", "one", "two", "three", "big", "small"]
BERT = {
    "model_type": "bert",
    "vocab_size": 16,
    "hidden_size": 16,
    "num_hidden_layers": 1,
    "num_attention_heads": 2,
    "intermediate_size": 32,
    "max_position_embeddings": 32,
}


def _task_dir(root, name, k, n_train, rng):
    d = root / name
    d.mkdir()
    for split, n in (("train", n_train), ("validation", 8), ("test", 8)):
        rows = []
        for _ in range(n):
            y = rng.randrange(k)  # the label's own word is in the text: learnable
            words = [*rng.choices(WORDS[3:], k=rng.randint(2, 6)), WORDS[y]]
            rng.shuffle(words)
            rows.append({"text": " ".join(words), "label": y})
        (d / f"{split}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (d / "labels.json").write_text(json.dumps([f"{name}{i}" for i in range(k)]))
    return str(d)


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """Two tiny classification tasks (2 and 3 classes, 24 and 16 training rows) and a
    tokenizer for them, on disk."""
    from tokenizers import Tokenizer
    from tokenizers.models import WordLevel
    from tokenizers.pre_tokenizers import Whitespace

    root = tmp_path_factory.mktemp("multitask")
    vocab = {"[PAD]": 0, "[UNK]": 1} | {w: i + 2 for i, w in enumerate(WORDS)}
    tok = Tokenizer(WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = Whitespace()
    tok.save(str(root / "tokenizer.json"))
    rng = random.Random(0)
    return {
        "root": root,
        "a": _task_dir(root, "a", 2, 24, rng),
        "b": _task_dir(root, "b", 3, 16, rng),
        "tokenizer": str(root / "tokenizer.json"),
    }


def _raw(world, tmp_path, **data):
    return {
        "name": "mt",
        "model": {"random": dict(BERT), "task": "classification", "dropout": False},
        "data": {
            "tasks": [{"name": "a", "path": world["a"]}, {"name": "b", "path": world["b"]}],
            "tokenizer": world["tokenizer"],
            "batch_size": 8,
            "eval_batch_size": 8,
            "max_len": 16,
            **data,
        },
        "lora": {"rank": 2, "targets": ["query", "value"], "trainable": ["classifier"]},
        "optim": {"lr": 0.05},
        "train": {"max_steps": 4, "eval_every": 2, "log_every": 1, "linear_probe": True},
        "checkpoint": {"every_steps": 2},
        "output": {"dir": str(tmp_path / "run"), "progress": False, "tensorboard": False},
    }


# Config ----------------------------------------------------------------------------------------

TASKS = [{"name": "a", "path": "x"}, {"name": "b", "path": "y"}]


@pytest.mark.parametrize(
    ("data", "model", "match"),
    [
        ({"tasks": []}, {}, "data.tasks is empty"),
        ({"tasks": [TASKS[0], TASKS[0]]}, {}, r"task names must be unique, \['a'\] repeat"),
        ({"tasks": [{"name": "a/b", "path": "x"}]}, {}, "task name 'a/b' must start with"),
        ({"tasks": [{"path": "x"}]}, {}, "every task needs a name"),
        ({"tasks": [{"name": "a"}]}, {}, "task 'a' needs a path"),
        ({"tasks": [{"name": "a", "path": "x", "num_labels": 1}]}, {}, "num_labels must be >= 2"),
        ({"tasks": [{"name": "a", "path": "x", "foo": 1}]}, {}, r"unknown key 'data.tasks\[0\].foo'"),
        ({"tasks": TASKS, "path": "x"}, {}, "set data.path or data.tasks"),
        ({"tasks": TASKS, "temperature": 2.0}, {}, "data.temperature needs data.mixing"),
        ({"tasks": TASKS, "mixing": "temperature"}, {}, "needs data.temperature"),
        ({"tasks": TASKS, "mixing": "temperature", "temperature": 0}, {}, "data.temperature must be > 0"),
        ({"tasks": TASKS, "group_by_length": True}, {}, "data.group_by_length is not supported"),
        ({"tasks": TASKS, "packing": True}, {}, "data.packing is not supported"),
        ({"path": "x", "mixing": "size"}, {}, "data.mixing is for multitask runs"),
        ({"path": "x", "adapters": "shared"}, {}, "data.adapters is for multitask runs"),
        ({"tasks": TASKS, "adapters": "both"}, {}, "data.adapters: expected one of 'per_task', 'shared'"),
        (
            {"tasks": [TASKS[0], {"name": "lm", "path": "y", "kind": "causal_lm"}]},
            {},
            r"data.tasks\[1\] \('lm'\) is a 'causal_lm' task, but model.task is 'classification'",
        ),
        ({"tasks": TASKS}, {"num_labels": 3}, "model.num_labels does not apply to a multitask run"),
        (  # the value and the choices (it said: expected list of mapping or null)
            {"tasks": [{"name": "a", "path": "x", "kind": "regression"}]},
            {},
            r"^data.tasks\[0\].kind: expected one of 'classification', 'causal_lm', got str "
            r"'regression'$",
        ),
    ],
)  # fmt: skip
def test_config_errors(data, model, match):
    raw = {
        "model": {"random": {"model_type": "bert"}, "task": "classification", **model},
        "data": data,
    }
    with pytest.raises((C.ConfigError, ValueError), match=match):
        C.from_dict(raw)


def test_demo_config_loads():
    cfg = C.load_config("configs/minilm-multitask.yaml", ["data.adapters=shared"])
    assert [t.name for t in cfg.data.tasks] == ["compsent", "questype"]
    assert cfg.data.adapters == "shared" and cfg.data.mixing == "size"
    assert C.from_dict(C.to_dict(cfg)) == cfg  # config.yaml of the run reads back


def test_a_task_without_labels_json_needs_num_labels(world, tmp_path):
    (tmp_path / "c").mkdir()
    raw = _raw(world, tmp_path)
    raw["data"]["tasks"].append({"name": "c", "path": str(tmp_path / "c")})
    with pytest.raises(  # every problem of the empty folder at once, its labels.json last
        C.ConfigError,
        match=r"^4 problems with the data: data.tasks\[2\] \('c'\): path: .*/c/train.jsonl does "
        r"not exist; .* data.tasks\[2\] \('c'\): .*/c/labels.json does not exist and "
        r"model.num_labels is not set",
    ):
        prepare(C.from_dict(raw))


def test_a_label_beyond_a_tasks_num_labels_names_the_task_file_and_line(world, tmp_path):
    raw = _raw(world, tmp_path)
    raw["data"]["tasks"][1]["num_labels"] = 2  # b has labels 0..2
    path = f"{world['b']}/train.jsonl"
    with open(path) as f:
        line = next(i for i, r in enumerate(f, 1) if json.loads(r)["label"] == 2)
    cfg = C.from_dict(raw)
    objective, _, _ = base_tree(cfg, shapes_only=True)  # no weights: the data alone
    with pytest.raises(
        C.ConfigError,
        match=rf"^data.tasks\[1\] \('b'\): {path}:{line}: label 2 is class 2, beyond the "
        r"model's 2 classes \(num_labels 2: classes 0..1\)$",
    ):
        objective.load_data(cfg, BERT["vocab_size"])


# Mixing ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("temperature", [1.0, 2.0, 5.0])
def test_mixing_probs_follow_the_temperature_formula(temperature):
    sizes = [3000, 2000, 100]
    # p_t = n_t^(1/T) / sum_s n_s^(1/T), written out in float64
    want = [n ** (1 / temperature) for n in sizes]
    want = [w / sum(want) for w in want]
    np.testing.assert_allclose(D.mixing_probs(sizes, temperature), want, rtol=1e-12)
    if temperature == 1.0:  # size-proportional
        np.testing.assert_allclose(D.mixing_probs(sizes), [3000 / 5100, 2000 / 5100, 100 / 5100])


def test_mixing_probs_errors():
    with pytest.raises(ValueError, match="sizes must be positive counts"):
        D.mixing_probs([3, 0])
    with pytest.raises(ValueError, match="temperature must be > 0"):
        D.mixing_probs([3, 1], 0.0)


def test_batches_mix_the_tasks_in_proportion():
    probs = D.mixing_probs([300, 100, 50], 2.0)
    b = D.MixingBatcher([300, 100, 50], 16, probs=probs, seed=3)
    counts = np.stack([b.counts(m) for m in range(2000)])
    assert (counts.sum(1) == 16).all()
    share = counts.sum(0) / counts.sum()
    # 32,000 multinomial slots: the share's standard error is below 0.003
    np.testing.assert_allclose(share, probs, atol=0.012)
    # each batch's rows are those of its counts: task t's rows lie in its offset range
    idx = b.indices(7)
    offsets = [0, 300, 400, 450]
    got = [int(((idx >= offsets[t]) & (idx < offsets[t + 1])).sum()) for t in range(3)]
    assert got == b.counts(7).tolist()


def test_every_task_example_once_per_pass_and_batches_replay_on_resume():
    b = D.MixingBatcher([10, 6], 4, probs=[0.5, 0.5], seed=1)
    seq = [b.indices(m) for m in range(12)]
    rows = np.concatenate(seq)
    for lo, n in ((0, 10), (10, 6)):
        mine = rows[(rows >= lo) & (rows < lo + n)]
        full = len(mine) // n
        for k in range(full):  # each pass over a task is a permutation of its examples
            assert sorted(mine[k * n : (k + 1) * n].tolist()) == list(range(lo, lo + n))
    # a fresh batcher (a resumed run) jumping straight to batch 9 gives the same rows
    fresh = D.MixingBatcher([10, 6], 4, probs=[0.5, 0.5], seed=1)
    np.testing.assert_array_equal(fresh.indices(9), seq[9])
    np.testing.assert_array_equal(fresh.indices(3), seq[3])
    other = D.MixingBatcher([10, 6], 4, probs=[0.5, 0.5], seed=2)
    assert any(not np.array_equal(other.indices(m), seq[m]) for m in range(12))


def test_task_weights_sum_the_task_means():
    rng = np.random.default_rng(0)
    tid = np.array([[0, 0, 2, 0], [2, 0, 0, 2]])
    loss = rng.random(tid.shape)
    w = D.task_weights(tid)
    want = loss[tid == 0].mean() + loss[tid == 2].mean()  # task 1 is absent
    np.testing.assert_allclose((w["loss_weight"] * loss).sum(), want, rtol=1e-6)
    np.testing.assert_allclose(w["weight"].sum(), 1.0, rtol=1e-6)


# The mixed step --------------------------------------------------------------------------------


def _plain_ce(task: Classification, tree, batch, rows, spec) -> np.ndarray:
    """Per-example cross-entropy (float64) of ``rows`` with the task's own single-task tree."""
    sub = {k: v[rows] for k, v in batch.items() if k in ("input_ids", "attention_mask")}
    logits, _ = task.forward(tree, sub)
    z = np.asarray(logits, np.float64)
    assert z.shape[-1] == spec.num_labels
    y = batch["labels"][rows]
    lse = np.log(np.exp(z - z.max(-1, keepdims=True)).sum(-1)) + z.max(-1)
    return lse - z[np.arange(len(y)), y]


@pytest.mark.parametrize("adapters", ["per_task", pytest.param("shared", marks=pytest.mark.slow)])
def test_the_step_loss_is_the_sum_of_each_tasks_mean_loss(world, tmp_path, adapters):
    p = prepare(C.from_dict(_raw(world, tmp_path, adapters=adapters)))
    assert type(p.batcher) is D.MixingBatcher
    frozen, ad = jlora.split(p.tree)
    keys = iter(jax.random.split(jax.random.key(5), 100))  # a trained-looking state: B != 0
    ad = jax.tree.map(
        lambda x: 0.3 * jax.random.normal(next(keys), x.shape) if np.ndim(x) else x, ad
    )
    batch = p.objective.train_batch(p, 0)  # grad_accum 1: the step's one micro-batch
    assert batch["task_id"].shape == (1, 8) and len(set(batch["task_id"][0].tolist())) == 2
    o = C.OptimConfig(name="sgd", lr=0.1, clip_norm=None)
    tx = make_optimizer(o, make_schedule(o, 10), ad)
    new, _, m = jax.jit(make_train_step(p.objective, tx))(
        ad, tx.init(ad), frozen, batch, jax.random.key(0)
    )
    flat = {k: v[0] for k, v in batch.items()}
    trees = task_trees(p.objective, jlora.combine(frozen, ad))  # each task's adapter and head alone
    trees_after = task_trees(p.objective, jlora.combine(frozen, new))
    want = 0.0
    for i, spec in enumerate(p.objective.specs):
        rows = np.flatnonzero(flat["task_id"] == i)
        sub = {k: flat[k][rows] for k in ("input_ids", "attention_mask")}
        y = flat["labels"][rows]
        single = Classification(_model_with_labels(p, spec.num_labels))
        assert trees[spec.name]["classifier"]["kernel"].value.shape[-1] == spec.num_labels
        t_frozen, t_ad = jlora.split(trees[spec.name])

        def loss(a, single=single, t_frozen=t_frozen, sub=sub, y=y):
            """The task's own model (its adapter, its head) on its examples: mean CE."""
            logits, _ = single.forward(jlora.combine(t_frozen, a), sub)
            return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()

        value, g = jax.jit(jax.value_and_grad(loss))(t_ad)
        want += float(value)
        if adapters == "per_task":
            # SGD: the task's adapter and head move by -lr * the gradient of its own mean loss
            want_ad = jax.tree.map(lambda x, gx: x - 0.1 * gx, t_ad, g)
            chex.assert_trees_all_close(
                jlora.split(trees_after[spec.name])[1], want_ad, atol=2e-6, rtol=1e-5
            )
    np.testing.assert_allclose(float(m["loss"]), want, rtol=1e-5)


def _base_with_head(p, k):
    """The run's base params with a zero ``k``-way classifier: the base a task's PEFT dir loads on."""
    base = dict(p.params)
    h = base["classifier"]["kernel"].shape[0]
    base["classifier"] = {"kernel": jnp.zeros((h, k)), "bias": jnp.zeros(k)}
    return base


def _model_with_labels(p, k):
    """The run's BERT module with a ``k``-class head (a task's own model)."""
    return p.objective.model.clone(
        config=dataclasses.replace(p.objective.model.config, num_labels=k)
    )


# Whole runs ------------------------------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.parametrize("adapters", ["per_task", "shared"])
def test_tiny_multitask_run(world, tmp_path, adapters):
    cfg = C.from_dict(_raw(world, tmp_path, adapters=adapters))
    s = train(cfg, echo=lambda m: None)
    out = tmp_path / "run"
    evals = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    evals = [r for r in evals if r["split"] == "eval"]
    assert [r["step"] for r in evals] == [2, 4]
    for r in evals:
        for t in ("a", "b"):
            assert 0.0 <= r[f"{t}/accuracy"] <= 1.0 and r[f"{t}/loss"] > 0
        np.testing.assert_allclose(r["loss"], r["a/loss"] + r["b/loss"], rtol=1e-6)
        np.testing.assert_allclose(r["accuracy"], (r["a/accuracy"] + r["b/accuracy"]) / 2)
    mt = s["multitask"]
    assert mt["adapters"] == adapters
    assert [mt["tasks"][t]["num_labels"] for t in ("a", "b")] == [2, 3]
    np.testing.assert_allclose([mt["tasks"][t]["mixing_prob"] for t in "ab"], [0.6, 0.4])
    for t in ("a", "b"):
        info = mt["tasks"][t]
        for part in ("before", "linear_probe", "after"):
            assert set(info[part]) == {"validation", "test"}, (t, part)
        assert info["after"]["test"]["accuracy"] == s["after"]["test"][f"{t}/accuracy"]
        assert info["peft_dir"] == str(out / "peft" / t)
    assert (out / "loss.png").stat().st_size > 0

    # peft/<task>/ holds the task's adapter and its own head: loading it onto a base with that
    # task's classes gives the trained model's logits for the task
    p = prepare(cfg)
    trained, _, step = from_checkpoint(cfg, out / "checkpoints")
    assert step == 4
    test = p.splits["test"]
    for i, spec in enumerate(p.objective.specs):
        sub = test.take(np.flatnonzero(test.task_ids == i))
        logits, _ = p.objective.logits(trained, sub)
        want = np.asarray(logits)[:, spec.offset : spec.offset + spec.num_labels]
        base = _base_with_head(p, spec.num_labels)
        loaded, lcfg = jlora.peft.load(out / "peft" / spec.name, base)
        single = Classification(_model_with_labels(p, spec.num_labels))
        loaded, _ = single.read_export(cfg, out / "peft" / spec.name, loaded, lcfg)  # its head
        got, _ = single.forward(loaded, sub)
        np.testing.assert_allclose(np.asarray(got), want, atol=1e-5)


@pytest.mark.slow
def test_a_resumed_multitask_run_replays_the_uninterrupted_one(world, tmp_path):
    import shutil

    cfg = C.from_dict(_raw(world, tmp_path / "full"))
    train(cfg, echo=lambda m: None)
    full = tmp_path / "full" / "run"
    cut = tmp_path / "cut" / "run"
    shutil.copytree(full, cut)
    shutil.rmtree(cut / "checkpoints" / "4")  # as if killed after the checkpoint of step 2
    cut_cfg = C.from_dict(_raw(world, tmp_path / "cut"))
    s = train(cut_cfg, resume=True, echo=lambda m: None)
    a, _, sa = from_checkpoint(cfg, full / "checkpoints")
    b, _, sb = from_checkpoint(cfg, cut / "checkpoints")
    assert sa == sb == 4 and s["steps"] == 4
    chex.assert_trees_all_close(jlora.split(a)[1], jlora.split(b)[1], atol=1e-6)
    full_eval = [r for r in map(json.loads, (full / "metrics.jsonl").read_text().splitlines())]
    cut_eval = [r for r in map(json.loads, (cut / "metrics.jsonl").read_text().splitlines())]
    pick = [(r["step"], r.get("a/accuracy")) for r in full_eval if r["split"] == "eval"]
    assert pick == [(r["step"], r.get("a/accuracy")) for r in cut_eval if r["split"] == "eval"]


@pytest.mark.slow
def test_the_task_directories_load_in_peft_as_named_adapters(world, tmp_path):
    """peft/<task>/ of a per-task run with ``model.pooling: cls`` loads in PEFT as the adapter
    named after the task, on a base with the task's classes: its hidden states, head and logits
    are jlora's. (Tasks with different class counts need a base each: a PeftModel has one
    classifier shape for all its adapters. Mean pooling's export: tests/test_exports.py.)"""
    torch, peft, transformers = require("torch"), require("peft"), require("transformers")
    base = tmp_path / "bert"
    tiny_bert("BertModel").save_pretrained(base)  # no head: the run adds every task's
    raw = _raw(world, tmp_path)
    raw["model"] = {
        "path": str(base), "task": "classification", "dropout": False, "pooling": "cls",
    }  # fmt: skip
    raw["train"]["linear_probe"] = False
    cfg = C.from_dict(raw)
    log: list[str] = []
    train(cfg, echo=log.append)
    (line,) = [m for m in log if m.startswith("[jlora] PEFT export ")]  # says what it wrote
    assert line.endswith(": PEFT SEQ_CLS: transformers' *ForSequenceClassification + "
                         "PeftModel.from_pretrained (its pooling is jlora's)"), line  # fmt: skip
    p = prepare(cfg)
    trained, _, _ = from_checkpoint(cfg, tmp_path / "run" / "checkpoints")
    trees = task_trees(p.objective, trained)
    test = p.splits["test"]
    ids = test.input_ids[:, :8]
    for spec in p.objective.specs:
        hf = transformers.BertForSequenceClassification.from_pretrained(
            base, num_labels=spec.num_labels, attn_implementation="eager"
        ).eval()
        d = str(tmp_path / "run" / "peft" / spec.name)
        pm = peft.PeftModel.from_pretrained(hf, d, adapter_name=spec.name)
        assert pm.active_adapter == spec.name
        with torch.no_grad():
            got = pm.base_model.model.bert(torch.from_numpy(ids).long()).last_hidden_state.numpy()
        model = _model_with_labels(p, spec.num_labels)
        want = jlora.lora(model.apply)({"params": trees[spec.name]}, ids).last_hidden_state
        np.testing.assert_allclose(got, np.asarray(want), atol=2e-5)
        head = pm.base_model.model.classifier.modules_to_save[spec.name]
        np.testing.assert_allclose(
            head.weight.detach().numpy().T, trees[spec.name]["classifier"]["kernel"].value
        )
        with torch.no_grad():
            logits = pm(torch.from_numpy(ids).long()).logits.numpy()
        want = jlora.lora(model.apply)({"params": trees[spec.name]}, ids).logits
        np.testing.assert_allclose(logits, np.asarray(want), atol=2e-5)


LLAMA = {
    "model_type": "llama",
    "vocab_size": 16,
    "hidden_size": 16,
    "intermediate_size": 32,
    "num_hidden_layers": 1,
    "num_attention_heads": 2,
    "num_key_value_heads": 1,
    "max_position_embeddings": 32,
}


@pytest.mark.slow
def test_causal_lm_tasks_sum_their_mean_token_losses(world, tmp_path):
    raw = _raw(world, tmp_path)
    raw["model"] = {"random": dict(LLAMA), "task": "causal_lm"}
    for t in raw["data"]["tasks"]:
        t["kind"] = "causal_lm"
    raw["lora"] = {"rank": 2, "targets": ["q_proj", "v_proj"]}
    raw["train"].update(linear_probe=False, max_steps=2)
    cfg = C.from_dict(raw)
    p = prepare(cfg)
    frozen, ad = jlora.split(p.tree)
    keys = iter(jax.random.split(jax.random.key(7), 100))
    ad = jax.tree.map(
        lambda x: 0.3 * jax.random.normal(next(keys), x.shape) if np.ndim(x) else x, ad
    )
    batch = p.objective.train_batch(p, 0)  # grad_accum 1: the step's one micro-batch
    assert batch["weight"].shape == (1, 8, batch["input_ids"].shape[-1] - 1)
    o = C.OptimConfig(name="sgd", lr=0.1, clip_norm=None)
    tx = make_optimizer(o, make_schedule(o, 10), ad)
    _, _, m = jax.jit(make_train_step(p.objective, tx))(
        ad, tx.init(ad), frozen, batch, jax.random.key(0)
    )
    flat = {k: v[0] for k, v in batch.items()}
    aset = jlora.multi.unstack(jlora.combine(frozen, ad), p.objective.names)
    want = 0.0
    for i, name in enumerate(p.objective.names):
        rows = np.flatnonzero(flat["task_id"] == i)
        ids, mask = flat["input_ids"][rows], flat["attention_mask"][rows]
        logits = jax.jit(CausalLM(p.objective.model).forward)(
            aset.tree(name), {"input_ids": ids, "attention_mask": mask}
        )[0]
        z = np.asarray(logits, np.float64)[:, :-1]
        lse = np.log(np.exp(z - z.max(-1, keepdims=True)).sum(-1)) + z.max(-1)
        ce = lse - np.take_along_axis(z, ids[:, 1:, None], -1)[..., 0]
        tok = mask[:, 1:].astype(bool)
        want += ce[tok].mean()  # the task's mean over its non-padding target tokens
    np.testing.assert_allclose(float(m["loss"]), want, rtol=1e-5)

    s = train(cfg, echo=lambda m: None)
    for t in ("a", "b"):
        info = s["multitask"]["tasks"][t]
        assert info["after"]["test"]["perplexity"] > 1 and info["num_labels"] is None
        got = json.loads((tmp_path / "run" / "peft" / t / "adapter_config.json").read_text())
        assert got["task_type"] == "CAUSAL_LM"
    assert "a/perplexity" in s["after"]["validation"]


@pytest.mark.slow
def test_export_peft_and_merge_write_one_directory_per_task(world, tmp_path):
    import yaml

    from jlora.cli import main
    from jlora.interop.models import from_pretrained

    raw = _raw(world, tmp_path)
    raw["train"]["linear_probe"] = False
    (tmp_path / "mt.yaml").write_text(yaml.safe_dump(raw))
    cfg = C.from_dict(raw)
    train(cfg, echo=lambda m: None)
    y = str(tmp_path / "mt.yaml")
    assert main(["export-peft", y, "--out", str(tmp_path / "exp"), "--step", "2"]) == 0
    assert main(["merge", y, "--out", str(tmp_path / "merged")]) == 0
    p = prepare(cfg)
    trained, _, _ = from_checkpoint(cfg, tmp_path / "run" / "checkpoints")
    at2, _, _ = from_checkpoint(cfg, tmp_path / "run" / "checkpoints", step=2)
    test = p.splits["test"]
    for i, spec in enumerate(p.objective.specs):
        assert (tmp_path / "exp" / spec.name / "adapter_config.json").is_file()
        sub = test.take(np.flatnonzero(test.task_ids == i))
        want = np.asarray(p.objective.logits(trained, sub)[0])[
            :, spec.offset : spec.offset + spec.num_labels
        ]
        # the merged model of the task: a plain HF BERT with the task's head
        model, params = from_pretrained(tmp_path / "merged" / spec.name, num_labels=spec.num_labels)
        got = model.apply(params, sub["input_ids"], attention_mask=sub["attention_mask"]).logits
        np.testing.assert_allclose(np.asarray(got), want, atol=1e-4)
        # export-peft --step 2: the task's adapter of step 2
        base = _base_with_head(p, spec.num_labels)
        loaded, lcfg = jlora.peft.load(tmp_path / "exp" / spec.name, base)
        single = Classification(_model_with_labels(p, spec.num_labels))
        loaded, _ = single.read_export(cfg, tmp_path / "exp" / spec.name, loaded, lcfg)
        want2 = np.asarray(p.objective.logits(at2, sub)[0])[
            :, spec.offset : spec.offset + spec.num_labels
        ]
        np.testing.assert_allclose(np.asarray(single.forward(loaded, sub)[0]), want2, atol=1e-5)
