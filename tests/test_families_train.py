"""The newer decoder families through ``jlora train``: SFT with the model's chat template, and
``model.task: classification`` on a decoder (its ``score`` head), exported as PEFT adapters that
transformers + peft load with the trained model's logits.

The models are tiny random Gemma 2 / Qwen3 checkpoints written by transformers into a temporary
directory, next to a word-level ``tokenizer.json`` and (for SFT) a ``tokenizer_config.json``
with a Gemma-style chat template; the runs are short (they check the plumbing and that the loss
falls, not a quality).
"""

from __future__ import annotations

import copy
import json
import random
from pathlib import Path

import jax
import numpy as np
import pytest
import yaml
from _hf_utils import FAMILIES, TINY_DECODER, require
from tokenizers import Tokenizer, decoders, models, pre_tokenizers

import jlora
from jlora.interop.checkpoint import AdapterCheckpointer
from jlora.train import config as C
from jlora.train.engine.setup import base_tree

TOL = 1e-5
WORDS = ["red", "green", "blue", "cat", "dog", "sun", "moon", "tree", "fish", "bird"]
DIGITS = [str(d) for d in range(10)]
#: [PAD] 0, <eos> 1, <bos> 2 as the Gemma configs number them; the chat markup; task words
VOCAB = ["[PAD]", "<eos>", "<bos>", "[UNK]", "<start_of_turn>", "<end_of_turn>", "user", "model"]
VOCAB += ["sort", "has", "red", ":", "=>", "yes", "no", *DIGITS, *WORDS[1:]]
#: Gemma's turn markup (written for these tests): user / model turns, the model's to continue
CHAT_TEMPLATE = (
    "{% for m in messages %}<start_of_turn> "
    "{{ 'model' if m['role'] == 'assistant' else m['role'] }} {{ m['content'] }} "
    "<end_of_turn> {% endfor %}{% if add_generation_prompt %}<start_of_turn> model {% endif %}"
)


def _write_model(family: str, directory: Path, **overrides) -> Path:
    """A tiny random ``family`` causal LM, its word-level tokenizer and chat template."""
    transformers = require("transformers")
    require("torch").manual_seed(0)
    config_name, causal, _, base = FAMILIES[family]
    kw = {
        **TINY_DECODER,
        **base,
        "vocab_size": 48,
        "bos_token_id": 2,
        "eos_token_id": 1,
        "pad_token_id": 0,
        "max_position_embeddings": 64,
        **overrides,
    }
    kw.pop("rope_scaling", None)
    model = getattr(transformers, causal)(getattr(transformers, config_name)(**kw))
    model.save_pretrained(directory)
    tok = Tokenizer(models.WordLevel({t: i for i, t in enumerate(VOCAB)}, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.decoder = decoders.WordPiece(prefix="##")
    tok.save(str(directory / "tokenizer.json"))
    (directory / "tokenizer_config.json").write_text(json.dumps({"chat_template": CHAT_TEMPLATE}))
    return directory


def _write_jsonl(path: Path, rows: list[dict]) -> None:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))


def _run(tmp_path: Path, raw: dict) -> tuple[C.RunConfig, dict]:
    from jlora.cli import main

    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump(raw))
    assert main(["train", str(path), "--set", "output.progress=false"]) == 0
    cfg = C.load_config(str(path))
    return cfg, json.loads((Path(cfg.output.dir) / "summary.json").read_text())


def _trained_tree(cfg: C.RunConfig):
    _, _, fresh = base_tree(cfg)
    with AdapterCheckpointer(Path(cfg.output.dir) / "checkpoints") as ckpt:
        tree, _, _ = ckpt.restore(fresh, require_opt_state=False)
    return tree


def _torch_logits(model, ids: np.ndarray, mask: np.ndarray) -> np.ndarray:
    torch = require("torch")
    with torch.no_grad():
        out = model(input_ids=torch.from_numpy(ids), attention_mask=torch.from_numpy(mask))
    return out.logits.numpy()


@pytest.mark.slow
def test_sft_with_the_models_chat_template(tmp_path):
    """Gemma 2 SFT on chat rows rendered by the model directory's chat template (the loss on
    the model turns only): the loss falls, and the PEFT export gives transformers + peft the
    trained model's logits."""
    peft, transformers = require("peft"), require("transformers")
    model_dir = _write_model("gemma2", tmp_path / "gemma2")
    rng = random.Random(0)
    data = tmp_path / "data"
    data.mkdir()
    for split, n in (("train", 256), ("validation", 32), ("test", 32)):
        rows = []
        for _ in range(n):
            ds = [rng.choice(DIGITS) for _ in range(rng.randint(2, 5))]
            user = "sort : " + " ".join(ds) + " =>"
            rows.append(
                {
                    "messages": [
                        {"role": "user", "content": user},
                        {"role": "assistant", "content": " ".join(sorted(ds))},
                    ]
                }
            )
        _write_jsonl(data / f"{split}.jsonl", rows)
    raw = {
        "name": "gemma2-sft",
        "model": {"path": str(model_dir), "task": "causal_lm"},
        "data": {
            "source": "jsonl",
            "path": str(data),
            "tokenizer": str(model_dir / "tokenizer.json"),
            "max_len": 32,
            "batch_size": 32,
            "eval_batch_size": 32,
        },
        "lora": {"rank": 8, "alpha": 16, "targets": ["q_proj", "v_proj", "o_proj", "down_proj"]},
        "optim": {"name": "adamw", "lr": 1.0e-2, "warmup_steps": 2},
        "train": {"seed": 0, "epochs": 3, "log_every": 8, "eval_every": 24},
        "checkpoint": {"every_steps": 24, "max_to_keep": 1},
        "output": {"dir": str(tmp_path / "out"), "tensorboard": False},
    }
    cfg, summary = _run(tmp_path, raw)
    before, after = summary["before"]["validation"]["loss"], summary["after"]["validation"]["loss"]
    print(f"gemma2 SFT (chat template): validation loss {before:.3f} -> {after:.3f}")
    assert after < 0.9 * before

    tree = _trained_tree(cfg)
    objective, _, _ = base_tree(cfg, shapes_only=True)
    ids = np.array([[2, 4, 6, 8, 17, 14, 12, 5, 4, 7]], np.int64)  # a rendered user turn
    mask = np.ones_like(ids)
    ours = jax.jit(jlora.lora(objective.model.apply))({"params": tree}, ids, mask)
    hf = transformers.AutoModelForCausalLM.from_pretrained(model_dir, attn_implementation="eager")
    pm = peft.PeftModel.from_pretrained(hf.eval(), Path(cfg.output.dir) / "peft").eval()
    diff = float(np.max(np.abs(np.asarray(ours) - _torch_logits(pm, ids, mask))))
    print(f"gemma2 SFT: exported adapter in PEFT vs the trained jlora model: {diff:.1e}")
    assert diff <= TOL


@pytest.mark.slow
def test_decoder_classification_run_exports_seq_cls(tmp_path):
    """``model.task: classification`` on a Qwen3 causal-LM checkpoint: a new ``score`` head on
    the last token, LoRA on q/v; accuracy rises; the SEQ_CLS export (head in modules_to_save)
    gives ``AutoModelForSequenceClassification`` + peft the trained model's logits."""
    peft, transformers = require("peft"), require("transformers")
    model_dir = _write_model("qwen3", tmp_path / "qwen3")
    rng = random.Random(1)
    data = tmp_path / "data"
    data.mkdir()
    (data / "labels.json").write_text(json.dumps(["no", "yes"]))
    for split, n in (("train", 256), ("validation", 64), ("test", 64)):
        rows = []
        for _ in range(n):
            words = rng.sample(WORDS[1:], rng.randint(2, 5))
            red = rng.random() < 0.5
            if red:
                words.insert(rng.randint(0, len(words)), "red")
            rows.append({"text": "has red : " + " ".join(words), "label": int(red)})
        _write_jsonl(data / f"{split}.jsonl", rows)
    raw = {
        "name": "qwen3-cls",
        "model": {"path": str(model_dir), "task": "classification"},
        "data": {
            "source": "jsonl",
            "path": str(data),
            "tokenizer": str(model_dir / "tokenizer.json"),
            "max_len": 16,
            "batch_size": 32,
            "eval_batch_size": 64,
        },
        "lora": {"rank": 8, "alpha": 16, "targets": ["q_proj", "v_proj"], "trainable": ["score"]},
        "optim": {"name": "adamw", "lr": 1.0e-2, "warmup_steps": 2},
        "train": {"seed": 0, "epochs": 3, "log_every": 8, "eval_every": 24, "linear_probe": True},
        "checkpoint": {"every_steps": 24, "max_to_keep": 1},
        "output": {"dir": str(tmp_path / "out"), "tensorboard": False},
    }
    cfg, summary = _run(tmp_path, raw)
    before, after = (summary[k]["test"]["accuracy"] for k in ("before", "after"))
    print(f"qwen3 classification: test accuracy {before:.3f} -> {after:.3f}")
    assert after >= 0.9 and after > before

    peft_dir = Path(cfg.output.dir) / "peft"
    saved = json.loads((peft_dir / "adapter_config.json").read_text())
    assert saved["task_type"] == "SEQ_CLS" and saved["modules_to_save"] == ["score"]
    tree = _trained_tree(cfg)
    objective, _, _ = base_tree(cfg, shapes_only=True)
    ids = np.zeros((3, 9), np.int64)
    mask = np.zeros_like(ids)
    words = ["has", "red", ":", "cat", "red", "dog", "sun", "moon", "fish"]
    for i, n in enumerate((9, 6, 4)):  # right-padded with [PAD] = pad_token_id 0
        ids[i, :n] = [VOCAB.index(w) for w in words[:n]]
        mask[i, :n] = 1
    ours = jax.jit(jlora.lora(objective.model.apply))({"params": tree}, ids, mask).logits
    hf = transformers.AutoModelForSequenceClassification.from_pretrained(
        model_dir, num_labels=2, attn_implementation="eager"
    )
    pm = peft.PeftModel.from_pretrained(copy.deepcopy(hf).eval(), peft_dir).eval()
    diff = float(np.max(np.abs(np.asarray(ours) - _torch_logits(pm, ids, mask))))
    print(f"qwen3 classification: SEQ_CLS export in PEFT vs the trained jlora model: {diff:.1e}")
    assert diff <= TOL

    # jlora merge: a Qwen3ForSequenceClassification directory with the merged weights
    from jlora.cli import main

    ck = ["--checkpoint", str(Path(cfg.output.dir) / "checkpoints")]
    assert main(["merge", str(tmp_path / "run.yaml"), *ck, "--out", str(tmp_path / "hf")]) == 0
    merged_config = json.loads((tmp_path / "hf" / "config.json").read_text())
    assert merged_config["architectures"] == ["Qwen3ForSequenceClassification"]
    assert merged_config["id2label"] == {"0": "no", "1": "yes"}
    merged = transformers.AutoModelForSequenceClassification.from_pretrained(
        tmp_path / "hf", attn_implementation="eager"
    ).eval()
    diff = float(np.max(np.abs(np.asarray(ours) - _torch_logits(merged, ids, mask))))
    print(
        f"qwen3 classification: jlora merge in transformers vs the trained jlora model: {diff:.1e}"
    )
    assert diff <= TOL


def test_decoder_multitask_classification_is_refused(tmp_path):
    rows = [{"text": "red cat", "label": 0}]
    for task in ("a", "b"):
        (tmp_path / task).mkdir()
        for split in ("train", "validation"):
            _write_jsonl(tmp_path / task / f"{split}.jsonl", rows)
    raw = {
        "name": "t",
        "model": {
            "random": {**TINY_DECODER, "model_type": "gemma2", "head_dim": 16},
            "task": "classification",
        },
        "data": {
            "source": "jsonl",
            "tasks": [{"name": t, "path": str(tmp_path / t), "num_labels": 2} for t in "ab"],
        },
        "lora": {"rank": 2, "targets": ["q_proj"], "trainable": ["score"]},
    }
    with pytest.raises(C.ConfigError, match=r"a decoder's score head \(model_type 'gemma2'\)"):
        base_tree(C.from_dict(raw), shapes_only=True)
