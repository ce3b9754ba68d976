"""Every export the trainer writes loads in PyTorch and computes jlora's logits.

The writers are the trainer's own (`jlora.train.io.export.write_peft`, which the run's
``peft/`` and ``jlora export-peft`` use, and `save_merged`, ``jlora merge``), fed trees with
random non-zero adapters and heads. The reference is jlora's forward of the same tree; the
PyTorch side is transformers + peft loading each directory the way it says it loads:

* a BERT classifier with ``model.pooling: cls``: PEFT ``SEQ_CLS`` in
  ``AutoModelForSequenceClassification``, and the merged model in the same class;
* with ``model.pooling: mean`` (the main job): the ``FEATURE_EXTRACTION`` adapter, or the merged
  ``BertModel``, through the ``load.py`` written beside it;
* a multitask run's ``<task>/`` directories, each as its task's classifier;
* a causal LM: PEFT ``CAUSAL_LM`` in ``AutoModelForCausalLM``, and the merged model.

Before ``model.pooling``, the main job's export said ``SEQ_CLS`` and its logits differed from
jlora's by up to 4.1 in ``BertForSequenceClassification`` (which classifies the [CLS] pooler).
"""

from __future__ import annotations

import dataclasses
import importlib.util
import json

import jax
import numpy as np
import pytest

import jlora
from jlora.interop.models.hub import config_from_hf
from jlora.train import load_config
from jlora.train.data.tokenize import load_tokenizer
from jlora.train.engine.model import resolve_model_path
from jlora.train.engine.setup import base_tree
from jlora.train.io.export import from_peft, save_merged, write_peft
from jlora.train.objectives import mean_pooled
from jlora.train.sections import ConfigError

TOL = 2e-5
TEXTS = ["I loved this film, not.", "The plot was dull but the acting was great.", "Why?"]


def _random_adapters(tree, seed=0):
    """``tree`` with every adapter child and trained leaf redrawn, N(0, 0.05) (non-zero B, a
    head): logits that move, at magnitudes where float32 attention still agrees."""
    frozen, adapters = jlora.split(tree)
    leaves, treedef = jax.tree.flatten(adapters)
    rng = np.random.default_rng(seed)
    leaves = [np.asarray(0.05 * rng.normal(size=np.shape(x)), np.asarray(x).dtype) for x in leaves]
    return jlora.combine(frozen, jax.tree.unflatten(treedef, leaves))


def _without_lora(tree):
    """``tree`` with every LoRA adapter's B set to zero: the base model and the head."""

    def zero(x):
        return (
            dataclasses.replace(x, b=np.zeros_like(x.b)) if isinstance(x, jlora.LoraWeight) else x
        )

    return jax.tree.map(zero, tree, is_leaf=lambda x: isinstance(x, jlora.LoraWeight))


def _batch(cfg):
    tok = load_tokenizer(cfg)
    tok.enable_padding(pad_id=0)
    enc = tok.encode_batch(TEXTS)
    return np.array([e.ids for e in enc]), np.array([e.attention_mask for e in enc])


def _loader(directory):
    spec = importlib.util.spec_from_file_location(f"load_{abs(hash(str(directory)))}",
                                                  directory / "load.py")  # fmt: skip
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.load()


def _torch_logits(model, ids, mask):
    import torch

    with torch.no_grad():
        out = model(torch.from_numpy(ids), torch.from_numpy(mask))
    return (out if isinstance(out, torch.Tensor) else out.logits).numpy()


def _classifier_exports(cfg, tmp_path, require):
    """``{kind: logits}`` of the PEFT and merged exports of a classifier of ``cfg`` (in the
    classes each names), and jlora's logits."""
    transformers, peft = require("transformers"), require("peft")
    objective, _, tree = base_tree(cfg)
    tree = _random_adapters(tree)
    ids, mask = _batch(cfg)
    fwd = jlora.lora(objective.model.apply)
    want = fwd({"params": tree}, ids, attention_mask=mask).logits
    base_only = fwd({"params": _without_lora(tree)}, ids, attention_mask=mask).logits
    assert np.abs(np.asarray(want) - np.asarray(base_only)).max() > 1e3 * TOL  # LoRA matters
    how = write_peft(objective, cfg, tmp_path / "peft", tree, cfg.lora)  # the run log's line
    assert ("SEQ_CLS" if cfg.model.pooling == "cls" else "load.py, which mean-pools") in how, how
    save_merged(cfg, tree, tmp_path / "merged")
    base = resolve_model_path(cfg.model.path)
    k = np.shape(want)[-1]
    if cfg.model.pooling == "cls":
        cls = transformers.AutoModelForSequenceClassification
        meta = json.loads((tmp_path / "peft" / "adapter_config.json").read_text())
        assert meta["task_type"] == "SEQ_CLS"
        peft_model = peft.PeftModel.from_pretrained(
            cls.from_pretrained(base, num_labels=k), tmp_path / "peft"
        ).eval()
        merged = cls.from_pretrained(tmp_path / "merged").eval()
    else:
        assert (
            json.loads((tmp_path / "peft" / "adapter_config.json").read_text())["task_type"]
            == "FEATURE_EXTRACTION"
        )
        peft_model, merged = _loader(tmp_path / "peft"), _loader(tmp_path / "merged")
    back, _ = from_peft(cfg, tmp_path / "peft")  # import-peft / merge --peft read it back
    # model.init_from a PEFT export merges its head too (a mean export keeps it in a file)
    init = dataclasses.replace(cfg.model, init_from=str(tmp_path / "peft"))
    merged_base = base_tree(dataclasses.replace(cfg, model=init))[1]
    np.testing.assert_array_equal(
        merged_base["classifier"]["kernel"], jlora.merge(tree)["classifier"]["kernel"]
    )
    got = {
        "peft": _torch_logits(peft_model, ids, mask),
        "merged": _torch_logits(merged, ids, mask),
        "jlora.from_peft": np.asarray(fwd({"params": back}, ids, attention_mask=mask).logits),
    }
    return got, np.asarray(want)


def test_pooling_errors(tmp_path):
    """``model.pooling`` outside classification, on a decoder, and a head file that does not fit
    the model are refused, naming what was expected."""
    with pytest.raises(ConfigError, match=r"model.pooling is for model.task 'classification' \("
                       r"a BERT encoder's sentence embedding\), not 'causal_lm'"):  # fmt: skip
        load_config("configs/llama-tiny.yaml", ["model.pooling=cls"])
    with pytest.raises(ValueError, match=r"pooling 'cls' is for encoders \(bert\); a llama "
                       r"model's classification head reads the last token"):  # fmt: skip
        config_from_hf({"model_type": "llama"}, num_labels=2, pooling="cls")
    tree = {"classifier": {"kernel": np.zeros((4, 3), np.float32), "bias": np.zeros(3)}}
    parts = mean_pooled.export_parts(tree, None)
    (tmp_path / "head.safetensors").write_bytes(parts.files["head.safetensors"])
    lcfg = jlora.LoraConfig(rank=1, targets=("x",))
    back, lcfg2 = mean_pooled.read_head(tmp_path, tree, lcfg)  # round trip, now trained
    assert isinstance(back["classifier"]["kernel"], jlora.Trainable)
    assert "^classifier/" in lcfg2.trainable
    two = {"classifier": {"kernel": np.zeros((4, 2), np.float32), "bias": np.zeros(2)}}
    with pytest.raises(ValueError, match=r"head.safetensors: weight \(3, 4\) and bias \(3,\) "
                       r"do not fit the model's classifier kernel \(4, 2\) \(expected weight "
                       r"\(2, 4\)\)"):  # fmt: skip
        mean_pooled.read_head(tmp_path, two, lcfg)


@pytest.mark.slow
@pytest.mark.parametrize("pooling", ["mean", "cls"])
def test_classifier_exports_give_jloras_logits_in_the_classes_they_name(pooling, tmp_path, require):
    require("torch")
    over = [f"model.pooling={pooling}", "model.dropout=false"]
    cfg = load_config("configs/minilm-lora.yaml", over)
    got, want = _classifier_exports(cfg, tmp_path, require)
    for kind, logits in got.items():
        d = float(np.abs(logits - want).max())
        print(f"{pooling} pooling, {kind}: max |logits diff| {d:.2e}")
        assert d <= TOL, (kind, d)


@pytest.mark.slow
def test_a_multitask_runs_task_directories_give_each_tasks_logits(tmp_path, require):
    require("torch")
    require("peft")
    cfg = load_config("configs/minilm-multitask.yaml", ["model.dropout=false"])
    objective, _, tree = base_tree(cfg)
    tree = _random_adapters(tree, seed=1)
    write_peft(objective, cfg, tmp_path / "peft", tree, cfg.lora)
    ids, mask = _batch(cfg)
    for name, (task_cfg, task_tree) in objective.export_trees(cfg, tree).items():
        model = base_tree(task_cfg, shapes_only=True)[0].model  # the task's classes
        want = jlora.lora(model.apply)({"params": task_tree}, ids, attention_mask=mask).logits
        got = _torch_logits(_loader(tmp_path / "peft" / name), ids, mask)
        d = float(np.abs(got - np.asarray(want)).max())
        print(f"multitask {name}: max |logits diff| {d:.2e}")
        assert got.shape == np.shape(want) and d <= TOL


@pytest.mark.slow
def test_causal_lm_exports_give_jloras_logits(tmp_path, require, hf):
    transformers, peft = require("transformers"), require("peft")
    base = tmp_path / "base"
    hf.tiny_causal_lm().save_pretrained(base)
    cfg = load_config("configs/llama-tiny.yaml", ["model.random=null", f"model.path={base}",
                                                  "lora.dropout=0.0"])  # fmt: skip
    objective, _, tree = base_tree(cfg)
    tree = _random_adapters(tree, seed=2)
    ids = np.random.default_rng(0).integers(0, 64, (2, 7))
    want = np.asarray(jlora.lora(objective.model.apply)({"params": tree}, ids))
    write_peft(objective, cfg, tmp_path / "peft", tree, cfg.lora)
    save_merged(cfg, tree, tmp_path / "merged")
    assert (
        json.loads((tmp_path / "peft" / "adapter_config.json").read_text())["task_type"]
        == "CAUSAL_LM"
    )
    cls = transformers.AutoModelForCausalLM
    models = {
        "peft": peft.PeftModel.from_pretrained(cls.from_pretrained(base), tmp_path / "peft"),
        "merged": cls.from_pretrained(tmp_path / "merged"),
    }
    for kind, model in models.items():
        d = float(np.abs(_torch_logits(model.eval(), ids, np.ones_like(ids)) - want).max())
        print(f"causal LM {kind}: max |logits diff| {d:.2e}")
        assert d <= 1e-4, (kind, d)
