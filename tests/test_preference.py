"""Preference objectives (``objective: dpo | simpo | orpo``, `jlora.train.objectives.preference`).

* The losses, implicit rewards and gradients on fixed log-probabilities against float64 numpy
  implementations of the published formulas (DPO sigmoid / cDPO, robust, hinge, IPO; SimPO;
  ORPO with its NLL term), computed here from the papers' equations, not from the code.
* Sequence log-probabilities against transformers + peft on the same tiny Llama and adapter
  (only completion tokens count: the prompt's are left out of both sums by position).
* The in-step reference (the adapters off, `jlora.base`) is the base model's log-probabilities;
  precomputing it gives the same step.
* Preference rows (strings and chat messages), their errors; config errors; ``model.init_from``.
"""

from __future__ import annotations

import functools
import json
import re
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from tokenizers import Tokenizer

import jlora
from jlora.interop.models.llama import LlamaConfig, LlamaForCausalLM
from jlora.train import config as C
from jlora.train.data.preference import encode_pairs, load_preference_jsonl
from jlora.train.engine.init_from import read_adapters
from jlora.train.engine.steps import make_optimizer, make_schedule, make_train_step
from jlora.train.objectives import DPO, ORPO, SimPO
from jlora.train.objectives import preference_losses as L
from jlora.train.objectives.preference import DPOConfig, ORPOConfig, SimPOConfig

TOKENIZER = "data/sft-tiny/tokenizer.json"
CHATML = (
    "{% for m in messages %}{{ '<|' + m['role'] + '|> ' + m['content'] + ' </s> ' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|assistant|>' }}{% endif %}"
)

# --- float64 references of the published formulas -----------------------------------------


def _logsig(z):
    return -np.logaddexp(0.0, -z)


def np_dpo(pc, pr, rc, rr, beta, loss_type, eps):
    """Rafailov et al. (2023) eq. 7 (cDPO: Mitchell 2023), robust DPO (Chowdhury et al. 2024,
    eq. 10), RSO's hinge (Liu et al. 2023), IPO (Azar et al. 2023, eq. 17)."""
    h = (pc - pr) - (rc - rr)
    z = beta * h
    loss = {
        "sigmoid": -(1 - eps) * _logsig(z) - eps * _logsig(-z),
        "robust": ((1 - eps) * -_logsig(z) - eps * -_logsig(-z)) / (1 - 2 * eps),
        "hinge": np.maximum(0.0, 1 - z),
        "ipo": (h - 1 / (2 * beta)) ** 2,
    }[loss_type]
    return loss, beta * (pc - rc), beta * (pr - rr)


def np_simpo(pc, pr, beta, gamma, eps):
    """Meng et al. (2024) eq. 6 on length-normalized log-probabilities (with label smoothing)."""
    z = beta * pc - beta * pr - gamma
    return -(1 - eps) * _logsig(z) - eps * _logsig(-z), beta * pc, beta * pr


def np_orpo(pc, pr, beta):
    """Hong et al. (2024) eqs. 6-8: L_SFT + λ·L_OR, L_OR = -log σ(log(odds_c / odds_r)),
    odds(y) = P / (1 - P) with P the per-token mean probability exp(p)."""
    odds = lambda p: np.exp(p) / (1 - np.exp(p))  # noqa: E731
    ratio = _logsig(np.log(odds(pc) / odds(pr)))
    return -pc - beta * ratio, beta * pc, beta * pr


RNG = np.random.default_rng(0)
PC, PR = -RNG.uniform(1, 30, 8), -RNG.uniform(1, 30, 8)  # summed log-probs: h of both signs
RC, RR = -RNG.uniform(1, 30, 8), -RNG.uniform(1, 30, 8)
MC, MR = -RNG.uniform(0.05, 3, 8), -RNG.uniform(0.05, 3, 8)  # per-token means

CASES = {
    "dpo-sigmoid": (lambda a, b: L.dpo_loss(a, b, RC, RR, beta=0.1, loss_type="sigmoid"),
                    lambda a, b: np_dpo(a, b, RC, RR, 0.1, "sigmoid", 0.0), PC, PR),
    "dpo-cdpo": (lambda a, b: L.dpo_loss(a, b, RC, RR, beta=0.3, label_smoothing=0.2),
                 lambda a, b: np_dpo(a, b, RC, RR, 0.3, "sigmoid", 0.2), PC, PR),
    "dpo-robust": (lambda a, b: L.dpo_loss(a, b, RC, RR, beta=0.2, loss_type="robust",
                                           label_smoothing=0.1),
                   lambda a, b: np_dpo(a, b, RC, RR, 0.2, "robust", 0.1), PC, PR),
    "dpo-hinge": (lambda a, b: L.dpo_loss(a, b, RC, RR, beta=0.5, loss_type="hinge"),
                  lambda a, b: np_dpo(a, b, RC, RR, 0.5, "hinge", 0.0), PC, PR),
    "dpo-ipo": (lambda a, b: L.dpo_loss(a, b, RC / 9, RR / 9, beta=0.1, loss_type="ipo"),
                lambda a, b: np_dpo(a, b, RC / 9, RR / 9, 0.1, "ipo", 0.0), MC, MR),
    "simpo": (lambda a, b: SimPO(None, config=SimPOConfig(label_smoothing=0.1)).pair_terms(
                  a, b, None, {}),
              lambda a, b: np_simpo(a, b, 2.0, 1.0, 0.1), MC, MR),
    "orpo": (lambda a, b: ORPO(None, config=ORPOConfig(beta=0.25)).pair_terms(a, b, None, {}),
             lambda a, b: np_orpo(a, b, 0.25), MC, MR),
}  # fmt: skip


def _parts(out):
    """``(losses, chosen rewards, rejected rewards)`` of a loss function or pair_terms dict."""
    if isinstance(out, dict):
        return out["loss"], out["rewards/chosen"], out["rewards/rejected"]
    return out[:3]


@pytest.mark.parametrize("case", sorted(CASES))
def test_losses_rewards_and_gradients_equal_the_float64_formulas(case):
    ours, ref, pc, pr = CASES[case]
    with jax.enable_x64(True):
        got = [np.asarray(x) for x in _parts(ours(jnp.asarray(pc), jnp.asarray(pr)))]
        grad = jax.grad(lambda a, b: jnp.mean(_parts(ours(a, b))[0]), argnums=(0, 1))
        g = [np.asarray(x) for x in grad(jnp.asarray(pc), jnp.asarray(pr))]
    want = ref(pc, pr)
    for a, b in zip(got, want, strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-12, atol=1e-12)
    # the gradient of the mean loss, by central differences of the float64 reference
    for k, x in enumerate((pc, pr)):
        num = np.zeros_like(x)
        for i in range(len(x)):
            up, down = [np.array(pc), np.array(pr)], [np.array(pc), np.array(pr)]
            up[k][i] += 1e-6
            down[k][i] -= 1e-6
            num[i] = (np.mean(ref(*up)[0]) - np.mean(ref(*down)[0])) / 2e-6
        np.testing.assert_allclose(g[k], num, rtol=1e-6, atol=1e-9)


def test_dpo_metrics_carry_trls_names_and_meanings():
    objective = DPO(None, config=DPOConfig(beta=0.5))
    ref = np.stack([RC, RR], -1)
    mask = np.ones((8, 2, 4), np.int32)
    out = objective.pair_terms(
        jnp.asarray(PC), jnp.asarray(PR), None, {"aux": ref, "loss_mask": mask}
    )
    loss, chosen, rejected = np_dpo(PC, PR, RC, RR, 0.5, "sigmoid", 0.0)
    want = {
        "loss": loss,
        "rewards/chosen": chosen,
        "rewards/rejected": rejected,
        "rewards/accuracies": (chosen > rejected).astype(float),
        "rewards/margins": chosen - rejected,
        "logps/chosen": PC,
        "logps/rejected": PR,
    }
    assert list(out) == list(want)
    for k, v in want.items():
        np.testing.assert_allclose(np.asarray(out[k]), v, rtol=1e-5, atol=1e-5, err_msg=k)
    assert 0 < float(np.mean(want["rewards/accuracies"])) < 1  # both outcomes occur


def test_unknown_dpo_loss_type_is_refused():
    with pytest.raises(ValueError, match=r"loss_type must be one of \('sigmoid', 'ipo'"):
        L.dpo_loss(PC, PR, RC, RR, beta=0.1, loss_type="kto")


# --- data ----------------------------------------------------------------------------------


def _write(path, rows) -> None:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))


def test_string_and_chat_pairs_train_the_completion_tokens_only(tmp_path):
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"chat_template": CHATML}))
    user = [{"role": "user", "content": "sort : 3 1"}]
    _write(
        tmp_path / "p.jsonl",
        [
            {"prompt": "sort : 3 1 =>", "chosen": " 1 3", "rejected": " 3 1"},
            {"prompt": user, "chosen": [{"role": "assistant", "content": "1 3"}], "rejected": "3"},
        ],
    )
    pairs = load_preference_jsonl(tmp_path / "p.jsonl", template_dir=tmp_path)
    assert pairs[1].prompt == "<|user|> sort : 3 1 </s> <|assistant|>"
    assert [t for t, trained in pairs[1].chosen.chunks if trained] == [" 1 3 </s> "]
    tok = Tokenizer.from_file(TOKENIZER)
    split, lengths = encode_pairs(tok, pairs[:1], 12, eos_id=1)
    vocab = json.loads(Path(TOKENIZER).read_text())["model"]["vocab"]
    prompt = [vocab[w] for w in ["sort", ":", "3", "1", "=>"]]
    for side, completion in enumerate(("1 3", "3 1")):
        want = prompt + [vocab[w] for w in completion.split()] + [1]
        assert split.input_ids[0, side, : len(want)].tolist() == want
        mask = np.zeros(12, np.int32)
        mask[len(prompt) : len(want)] = 1  # the completion and its EOS, never the prompt
        np.testing.assert_array_equal(split.loss_mask[0, side], mask)
    assert split.input_ids.shape == (1, 2, 12) and lengths == [8, 8]


@pytest.mark.parametrize(
    "row, message",
    [
        ({"prompt": "a", "chosen": "b"}, "expected an object with 'prompt', 'chosen' and"),
        ({"prompt": 3, "chosen": "b", "rejected": "c"}, "'prompt' must be a string or a list"),
        ({"prompt": "a", "chosen": ["b"], "rejected": "c"}, "a string 'prompt' needs string"),
        ({"prompt": "a", "chosen": " b", "rejected": " b"}, "'chosen' and 'rejected' are the same"),
        (
            {"prompt": [{"role": "user", "content": "a"}], "chosen": "b", "rejected": "c"},
            "conversational rows need a chat template",
        ),
    ],
)
def test_malformed_pairs_name_file_and_line(tmp_path, row, message):
    _write(tmp_path / "d.jsonl", [{"prompt": "a", "chosen": " b", "rejected": " c"}, row])
    with pytest.raises(ValueError, match=r"d.jsonl:2: " + re.escape(message)):
        load_preference_jsonl(tmp_path / "d.jsonl", template_dir=tmp_path)


# --- the model: sequence log-probs, the adapters-off reference -----------------------------


def _pair_batch(rng, n=3, length=10):
    """Random pairs: a shared prompt of 2-4 tokens, completions of 1-5, right-padded."""
    ids = np.zeros((n, 2, length), np.int32)
    mask, loss = np.zeros_like(ids), np.zeros_like(ids)
    starts = []
    for i in range(n):
        k = int(rng.integers(2, 5))
        prompt = rng.integers(3, 32, k)
        starts.append(k)
        for side in range(2):
            c = int(rng.integers(1, 6))
            seq = np.concatenate([prompt, rng.integers(3, 32, c)])
            ids[i, side, : len(seq)], mask[i, side, : len(seq)] = seq, 1
            loss[i, side, k : len(seq)] = 1
    return {"input_ids": ids, "attention_mask": mask, "loss_mask": loss}, starts


@pytest.mark.slow
def test_sequence_logps_equal_transformers_and_peft(tmp_path, hf):
    torch, peft = hf.require("torch"), hf.require("peft")
    hf_model = hf.tiny_causal_lm(vocab_size=32)
    hf_model.save_pretrained(tmp_path / "base", safe_serialization=True)
    pm = peft.get_peft_model(
        hf_model, peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "up_proj"])
    )
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():  # non-zero A and B: the adapters change the model
        for _, p in pm.named_parameters():
            if p.requires_grad:
                p.copy_(0.1 * torch.randn(p.shape, generator=gen))
    pm.save_pretrained(tmp_path / "adapter", safe_serialization=True)
    model, params = jlora.models.from_pretrained(tmp_path / "base")
    tree, _ = jlora.peft.load(tmp_path / "adapter", params)
    batch, starts = _pair_batch(np.random.default_rng(3))
    objective = DPO(model, config=DPOConfig())
    got, count = jax.jit(objective.logps)(tree["params"], batch)
    ids = torch.from_numpy(batch["input_ids"].reshape(-1, 10)).long()
    att = torch.from_numpy(batch["attention_mask"].reshape(-1, 10)).long()
    with torch.no_grad():
        logp = torch.log_softmax(pm.eval()(input_ids=ids, attention_mask=att).logits.double(), -1)
    want = np.zeros((6,))
    for row in range(6):  # the completion: from the prompt's end to the last real token
        end = int(att[row].sum())
        for t in range(starts[row // 2], end):
            want[row] += float(logp[row, t - 1, ids[row, t]])
    err = float(np.max(np.abs(np.asarray(got).reshape(-1) - want)))
    print(f"sequence log-probs: max |jlora - transformers+peft| = {err:.2e}")
    assert err < 1e-4
    n = batch["loss_mask"][..., 1:].sum(-1).reshape(-1)
    np.testing.assert_array_equal(np.asarray(count).reshape(-1), n)


@functools.cache
def _tiny_llama():
    cfg = LlamaConfig(vocab_size=32, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                      num_attention_heads=4, num_key_value_heads=2)  # fmt: skip
    model = LlamaForCausalLM(cfg)
    init = jax.jit(model.init)  # one compile instead of one per initializer op
    return model, init(jax.random.key(0), jnp.zeros((1, 4), jnp.int32))["params"]


@pytest.mark.slow
def test_reference_is_the_base_model_and_precomputing_it_changes_nothing(np_ref):
    """In the jitted DPO step, the reference is the base model's log-probs (the adapters off):
    feeding the base model's own log-probs as a precomputed reference gives the same step."""
    model, params = _tiny_llama()
    tree = np_ref.randomize(
        jlora.init(params, jlora.LoraConfig(rank=2, targets=["q_proj", "v_proj"]),
                   key=jax.random.key(1)), seed=4)  # fmt: skip
    frozen, adapters = jlora.split(tree)
    batch, _ = _pair_batch(np.random.default_rng(5), n=4)
    objective = DPO(model, config=DPOConfig(beta=0.3))
    base = jlora.lora(model.apply)  # the plain model on the original params: no jlora.base
    logits = base({"params": params}, batch["input_ids"].reshape(8, -1),
                  attention_mask=batch["attention_mask"].reshape(8, -1))  # fmt: skip
    ids = batch["input_ids"].reshape(8, -1)
    lp = jax.nn.log_softmax(np.asarray(logits, np.float64)[:, :-1])
    tok = np.take_along_axis(lp, ids[:, 1:, None], -1)[..., 0]
    ref = (tok * batch["loss_mask"].reshape(8, -1)[:, 1:]).sum(-1).reshape(4, 2)
    o = C.OptimConfig(name="sgd", lr=0.1, clip_norm=None)
    tx = make_optimizer(o, make_schedule(o, 10), adapters)
    step = jax.jit(make_train_step(objective, tx))
    in_step = step(adapters, tx.init(adapters), frozen, {k: v[None] for k, v in batch.items()},
                   jax.random.key(0))  # fmt: skip
    fed = {**batch, "aux": ref.astype(np.float32)}
    pre = step(adapters, tx.init(adapters), frozen, {k: v[None] for k, v in fed.items()},
               jax.random.key(0))  # fmt: skip
    for a, b in zip(jax.tree.leaves(in_step), jax.tree.leaves(pre), strict=True):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=2e-5, atol=2e-6)
    # and the policy differs from the reference (B != 0): the rewards are not zero
    assert abs(float(in_step[2]["rewards/margins"])) > 1e-3


# --- config and init_from ------------------------------------------------------------------


TINY = {
    "model_type": "llama",
    "vocab_size": 32,
    "hidden_size": 8,
    "intermediate_size": 16,
    "num_hidden_layers": 1,
    "num_attention_heads": 2,
}


def _raw(tmp_path, **objective):
    return {
        "name": "p",
        "model": {
            "random": {
                "model_type": "llama",
                "vocab_size": 32,
                "hidden_size": 8,
                "intermediate_size": 16,
                "num_hidden_layers": 1,
                "num_attention_heads": 2,
            }
        },
        "data": {"path": str(tmp_path), "tokenizer": TOKENIZER},
        "lora": {"rank": 2, "targets": ["q_proj"]},
        "objective": {"name": "dpo", **objective},
    }


@pytest.mark.parametrize(
    "patch, message",
    [
        ({"objective": {"name": "dpp"}}, "objective.name: 'dpp' is not an objective (did you mean"),
        ({"objective": {"name": "dpo", "betta": 1}}, "unknown key 'objective.betta' (did you mean"),
        ({"objective": {"name": "dpo", "beta": 0}}, "objective.beta must be > 0, got 0.0"),
        ({"objective": {"name": "dpo", "loss_type": "kto"}}, "objective.loss_type: expected one of"),
        ({"objective": {"name": "dpo", "label_smoothing": 0.5}}, "objective.label_smoothing must be"),
        (
            {"objective": {"name": "dpo", "loss_type": "ipo", "label_smoothing": 0.1}},
            "objective.label_smoothing is for loss_type 'sigmoid' or 'robust', not 'ipo'",
        ),
        ({"lora": {"rank": 2, "targets": ["q_proj"], "trainable": ["lm_head"]}},
         "objective 'dpo' computes its reference with the adapters off"),
        ({"model": {"task": "classification"}}, "objective 'dpo' trains a decoder"),
        ({"data": {"packing": True}}, "data.packing is not supported with objective 'dpo'"),
        ({"train": {"early_stopping_metric": "accuracy"}}, "train.early_stopping_metric 'accuracy'"),
        ({"checkpoint": {"best_metric": "eval_accuracy"}}, "objective 'dpo' reports no accuracy"),
        ({"objective": {"name": "simpo", "gamma": float("inf")}}, "objective.gamma must be finite"),
        ({"data": {"tasks": [{"name": "a", "path": "x"}]}}, "data.tasks makes a multitask run"),
        ({"model": {"init_from": ""}}, "model.init_from must not be empty"),
    ],
)  # fmt: skip
def test_config_errors(tmp_path, patch, message):
    raw = _raw(tmp_path)
    for section, values in patch.items():
        raw[section] = {**raw[section], **values} if section in raw else values
    with pytest.raises((C.ConfigError, TypeError, ValueError), match=re.escape(message)):
        C.from_dict(raw)


def test_config_round_trips_and_precompute_allows_trainable_leaves(tmp_path):
    raw = _raw(tmp_path, precompute_ref=True, loss_type="robust", label_smoothing=0.1)
    raw["lora"]["trainable"] = ["lm_head"]
    cfg = C.from_dict(raw)
    assert cfg.objective == DPOConfig(precompute_ref=True, loss_type="robust", label_smoothing=0.1)
    assert C.from_dict(C.to_dict(cfg)) == cfg
    assert C.from_dict({**raw, "objective": "orpo"}).objective == ORPOConfig()


def test_init_from_errors_name_the_path(tmp_path):
    _, params = _tiny_llama()
    with pytest.raises(C.ConfigError, match=r"model.init_from .*nowhere: no such directory"):
        read_adapters(tmp_path / "nowhere", params)
    (tmp_path / "empty").mkdir()
    with pytest.raises(C.ConfigError, match=r"neither a jlora run directory \(with checkpoints/\)"):
        read_adapters(tmp_path / "empty", params)
    (tmp_path / "run" / "checkpoints").mkdir(parents=True)
    with pytest.raises(C.ConfigError, match=r"model.init_from .*run: .*holds no checkpoint"):
        read_adapters(tmp_path / "run", params)
    # a PEFT adapter of another model: its kernels do not fit these params
    other = {"model": {"layers_0": {"self_attn": {"q_proj": {"kernel": jnp.ones((16, 16))}}}}}
    lcfg = jlora.LoraConfig(rank=2, targets=["q_proj"])
    jlora.peft.save(tmp_path / "peft", jlora.init(other, lcfg, key=jax.random.key(0)), lcfg)
    with pytest.raises(C.ConfigError, match=r"model.init_from .*peft: "):
        read_adapters(tmp_path / "peft", params)


def test_init_from_a_peft_dir_merges_its_adapters(tmp_path, np_ref):
    _, params = _tiny_llama()
    lcfg = jlora.LoraConfig(rank=2, targets=["q_proj", "v_proj"])
    tree = np_ref.randomize(jlora.init(params, lcfg, key=jax.random.key(0)), seed=1)
    jlora.peft.save(tmp_path / "peft", tree, lcfg)
    got = jlora.merge(read_adapters(tmp_path / "peft", params))
    q = tree["model"]["layers_0"]["self_attn"]["q_proj"]["kernel"]
    np.testing.assert_allclose(
        got["model"]["layers_0"]["self_attn"]["q_proj"]["kernel"], np_ref.merged(q), atol=1e-5
    )


# --- a whole run ---------------------------------------------------------------------------

SFT_ROWS = [
    {"prompt": "sort : 3 1 2 =>", "completion": " 1 2 3"},
    {"prompt": "reverse : red cat =>", "completion": " cat red"},
    {"prompt": "sort : 9 4 =>", "completion": " 4 9"},
    {"prompt": "reverse : sun dog moon =>", "completion": " moon dog sun"},
]


def _run_raw(tmp_path, name, data, **extra):
    raw = {
        "name": name,
        "model": {"random": {**TINY, "hidden_size": 16, "eos_token_id": 1, "pad_token_id": 0}},
        "data": {"path": str(data), "tokenizer": TOKENIZER, "batch_size": 4, "eval_batch_size": 8},
        "lora": {"rank": 2, "targets": ["q_proj", "v_proj"]},
        "optim": {"lr": 0.05},
        "train": {"max_steps": 4, "eval_every": 4, "log_every": 1, "eval_generate": 4},
        "checkpoint": {"every_steps": 4},
        "output": {"dir": str(tmp_path / name), "progress": False, "tensorboard": False},
    }
    for k, v in extra.items():
        raw[k] = {**raw[k], **v} if isinstance(v, dict) and k in raw else v
    return C.from_dict(raw)


@pytest.mark.slow
def test_a_dpo_run_from_an_sft_run(tmp_path):
    """SFT run -> DPO run with ``model.init_from`` (the SFT adapters merged: the reference is
    the SFT model): TRL's metric names in metrics.jsonl, the summary, the table and the plot;
    at step 0 the policy is the reference (rewards 0) and its log-probs are the SFT model's."""
    from jlora.train import train
    from jlora.train.engine.setup import base_tree
    from jlora.train.io.export import from_checkpoint

    sft_data, dpo_data = tmp_path / "sft", tmp_path / "dpo"
    sft_data.mkdir(), dpo_data.mkdir()
    for split in ("train", "validation", "test"):
        _write(sft_data / f"{split}.jsonl", SFT_ROWS * 2)
        pairs = [{"prompt": r["prompt"], "chosen": r["completion"],
                  "rejected": " " + " ".join(r["completion"].split()[::-1])} for r in SFT_ROWS]  # fmt: skip
        _write(dpo_data / f"{split}.jsonl", pairs * 2)
    sft_cfg = _run_raw(tmp_path, "sft", sft_data)
    train(sft_cfg, echo=lambda m: None)
    lines = []
    cfg = _run_raw(tmp_path, "dpo", dpo_data, objective={"name": "dpo", "beta": 0.5},
                   model={"init_from": str(tmp_path / "sft")})  # fmt: skip
    s = train(cfg, echo=lines.append)
    names = ["loss", "rewards/chosen", "rewards/rejected", "rewards/accuracies",
             "rewards/margins", "logps/chosen", "logps/rejected"]  # fmt: skip
    records = [json.loads(x) for x in (tmp_path / "dpo" / "metrics.jsonl").read_text().splitlines()]
    for split in ("train", "eval"):
        assert all(set(names) <= set(r) for r in records if r["split"] == split)
    before, after = s["before"]["validation"], s["after"]["validation"]
    assert before["rewards/margins"] == before["rewards/chosen"] == 0.0  # B = 0 at step 0
    assert after["rewards/margins"] != 0.0 and 0.0 <= after["exact_match"] <= 1.0
    assert "rewards/accuracies before" in lines[-1] and (tmp_path / "dpo" / "loss.png").exists()
    # the step-0 policy (and the reference) is the SFT model: its log-probs, by hand
    sft_tree = from_checkpoint(sft_cfg, tmp_path / "sft" / "checkpoints")[0]
    objective = base_tree(cfg, shapes_only=True)[0]
    from jlora.train.engine.setup import prepare

    split = prepare(cfg).splits["eval"]
    batch = split.take(np.arange(len(split)))
    got = objective.logps(sft_tree, batch)[0]
    np.testing.assert_allclose(before["logps/chosen"], float(np.mean(got[:, 0])), rtol=1e-4)
