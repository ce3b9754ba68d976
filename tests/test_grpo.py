"""``objective: grpo`` (`jlora.train.objectives.grpo`) and the engine hooks it plugs in by.

* The engine: ``Objective.updates_per_batch`` = μ gives μ optimizer updates per step, equal to
  μ steps of one update on the same batch; the learning-rate schedule follows the steps.
* Rewards (built-ins against their definitions, user functions, the errors naming the function
  and the example), prompt data, rollout rows, config refusals, the summary table.
* On a tiny Llama (slow): with β = 0 and μ = 1 one SGD step equals the REINFORCE gradient with a
  group baseline (computed from the model's log-softmax); the scoring program's reference and
  old log-probs against the plain / merged model; rollout batches; a 4-step run: 3 programs
  compiled in the first step and none after, its metrics, PEFT export and ``jlora generate``,
  and a resumed run replaying bit for bit.
"""

from __future__ import annotations

import dataclasses
import json
import shutil
import sys
import textwrap
import types
from pathlib import Path

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import jlora
from jlora import cli
from jlora.train import train
from jlora.train.config import from_dict
from jlora.train.data.prompts import left_padded, load_prompt_jsonl
from jlora.train.engine.compiles import CompileCounter
from jlora.train.engine.loop import TrainingLoop
from jlora.train.engine.setup import base_tree, prepare
from jlora.train.engine.steps import make_optimizer, make_schedule, make_train_step
from jlora.train.io import export
from jlora.train.io.metrics import read_metrics
from jlora.train.objectives.base import Objective
from jlora.train.objectives.rewards import RewardConfig, RewardError, build_rewards, score
from jlora.train.objectives.rollout import completions, training_rows
from jlora.train.sections import ConfigError, OptimConfig

CHAT = (
    "{% for m in messages %}{{ '<' + m['role'] + '> ' + m['content'] + ' </s> ' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<assistant>' }}{% endif %}"
)

# --- the engine: mu updates per batch -------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class _Quadratic(Objective):
    """A least-squares fit of ``y`` by ``x @ kernel`` (LoRA on the kernel)."""

    mu: int = 1

    @property
    def updates_per_batch(self) -> int:
        return self.mu

    def terms(self, params, batch, *, key=None):
        pred = jlora.lora(lambda p, x: x @ p["kernel"])(params, batch["input_ids"])
        err = jnp.sum((pred - batch["y"]) ** 2, -1)
        return {
            "loss": jnp.sum(err),
            "weight": jnp.float32(err.shape[0]),
            "correct": jnp.float32(0),
        }

    def weights(self, batch):
        return jnp.ones(batch["input_ids"].shape[:-1])


def _quadratic_setup():
    k = jax.random.split(jax.random.key(0), 4)
    tree = jlora.init(
        {"kernel": jax.random.normal(k[0], (4, 3))},
        jlora.LoraConfig(rank=2, targets="kernel", init="gaussian"),
        key=k[1],
    )
    frozen, adapters = jlora.split(tree)
    adapters = jax.tree.map(lambda a: a + 0.1, adapters)  # B != 0
    x = jax.random.normal(k[2], (2, 5, 4))  # 2 micro-batches of 5
    batch = {
        "input_ids": x,
        "attention_mask": jnp.ones((2, 5, 1)),
        "y": jax.random.normal(k[3], (2, 5, 3)),
    }
    return frozen, adapters, batch


def test_updates_per_batch_equal_that_many_steps_on_the_batch():
    frozen, adapters, batch = _quadratic_setup()
    o = OptimConfig(name="adam", lr=0.05, warmup_steps=0, warmup_ratio=0.0, schedule="linear")
    key = jax.random.key(1)
    # three updates in one step (schedule counted in steps: all three at the lr of step 0 ...)
    tx3 = make_optimizer(o, make_schedule(o, 10), adapters, updates_per_step=3)
    step3 = jax.jit(make_train_step(_Quadratic(None, mu=3), tx3))
    a3, _, m3 = step3(adapters, tx3.init(adapters), frozen, batch, key)
    # ... equal three one-update steps with the schedule held at step 0
    tx1 = make_optimizer(o, lambda count: make_schedule(o, 10)(0 * count), adapters)
    step1 = jax.jit(make_train_step(_Quadratic(None, mu=1), tx1))
    a1, s1, losses = adapters, tx1.init(adapters), []
    for _ in range(3):
        a1, s1, m = step1(a1, s1, frozen, batch, key)
        losses.append(float(m["loss"]))
    chex.assert_trees_all_close(a3, a1, rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(float(m3["loss"]), np.mean(losses), rtol=1e-5)  # their mean
    assert bool(m3["finite"]) and float(m3["tokens"]) == 10.0
    assert losses[2] < losses[0]


def test_schedule_counts_steps_with_several_updates_per_step():
    o = OptimConfig(name="sgd", lr=1.0, warmup_steps=4, schedule="constant", clip_norm=None)
    _, adapters, _ = _quadratic_setup()
    tx = make_optimizer(o, make_schedule(o, 8), adapters, updates_per_step=2)
    state = tx.init(adapters)
    # sgd's update is -lr * g: read the lr of updates 0..5 from a unit gradient
    g = jax.tree.map(jnp.ones_like, adapters)
    lrs = []
    for _ in range(6):
        u, state = tx.update(g, state, adapters)
        lrs.append(-float(jax.tree.leaves(u)[0].ravel()[0]))
    np.testing.assert_allclose(lrs, [0.0, 0.0, 0.25, 0.25, 0.5, 0.5], atol=1e-7)


# --- rewards --------------------------------------------------------------------------------


def _reward_module(tmp_path, monkeypatch, body: str) -> str:
    (tmp_path / "my_rewards.py").write_text(textwrap.dedent(body))
    monkeypatch.syspath_prepend(str(tmp_path))
    sys.modules.pop("my_rewards", None)
    return "my_rewards"


def np_overlong(n, limit, buffer):
    """DAPO (Yu et al. 2025) eq. 13: 0 below L_max - L_cache, linear to -1 at L_max, then -1."""
    if n <= limit - buffer:
        return 0.0
    if n <= limit:
        return ((limit - buffer) - n) / buffer
    return -1.0


def test_builtin_rewards():
    rewards = build_rewards(
        [
            RewardConfig(name="exact_match"),
            RewardConfig(name="regex", pattern=r"\d( \d)*"),
            RewardConfig(name="length", max_tokens=6, buffer=3, weight=0.5),
        ],
        max_new_tokens=8,
    )
    texts = ["1 9 ", "1 8", "19x", " 1   9"]  # regex: literal; exact match: whitespace runs
    ids = [[4, 5], [4, 6, 1], list(range(5)), list(range(8))]
    got = score(rewards, texts, {"answer": "1 9"}, ids, where="x")
    np.testing.assert_array_equal(got[0], [1, 0, 0, 1])
    np.testing.assert_array_equal(got[1], [1, 1, 0, 0])
    np.testing.assert_allclose(got[2], [np_overlong(len(i), 6, 3) for i in ids])
    assert got[2].tolist() == [0.0, 0.0, -2 / 3, -1.0]
    hard = build_rewards([RewardConfig(name="length")], max_new_tokens=2)[0]
    assert score([hard], ["", ""], {}, [[1, 2], [1, 2, 3]], where="x")[0].tolist() == [0.0, -1.0]


def test_user_reward_by_import_path(tmp_path, monkeypatch):
    mod = _reward_module(
        tmp_path,
        monkeypatch,
        """
        def digits(completions, example):
            return [sum(c.isdigit() for c in t) / example["scale"] for t in completions]

        def by_ids(completions, example, completion_ids):
            return [float(len(i)) for i in completion_ids]
        """,
    )
    cfgs = [
        RewardConfig(function=f"{mod}:digits", weight=2.0),
        RewardConfig(function=f"{mod}:by_ids"),
        RewardConfig(function=f"{mod}:digits"),
    ]
    rewards = build_rewards(cfgs, max_new_tokens=4)
    assert [r.title for r in rewards] == [f"{mod}:digits", f"{mod}:by_ids", f"{mod}:digits_2"]
    got = score(rewards, ["1 2", "a"], {"scale": 2}, [[1, 2, 3], [4]], where="x")
    assert got.tolist() == [[1.0, 0.0], [3.0, 1.0], [1.0, 0.0]]
    assert rewards[0].weight == 2.0


@pytest.mark.parametrize(
    "body,match",
    [
        ("def f(c, e):\n    return 1 / 0\n", r"reward objective.rewards\[0\] \(my_rewards:f\) "
         r"raised ZeroDivisionError: division by zero on example 7 \(add : 1 \+ 2\)"),
        ("def f(c, e):\n    return [1.0]\n", r"\(my_rewards:f\) returned shape \(1,\) for 2 "
         r"completions on example 7 .*expected one float per completion"),
        ("def f(c, e):\n    return 'ab'\n", r"returned a str for 2 completions"),
        ("def f(c, e):\n    return [1.0, float('nan')]\n", r"returned nan for completion 1 on "
         r"example 7 .*rewards must be finite"),
        ("def f(c, e):\n    return [{}, 1]\n", r"returned a list for 2 completions"),
    ],
)  # fmt: skip
def test_a_bad_user_reward_names_itself_and_the_example(tmp_path, monkeypatch, body, match):
    mod = _reward_module(tmp_path, monkeypatch, body)
    rewards = build_rewards([RewardConfig(function=f"{mod}:f")], max_new_tokens=4)
    with pytest.raises(RewardError, match=match):
        score(rewards, ["1", "2"], {}, [[1], [2]], where="example 7 (add : 1 + 2)")


@pytest.mark.parametrize(
    "kw,match",
    [
        ({}, "each entry needs a built-in 'name'"),
        ({"name": "exact_match", "function": "a:b"}, "not both"),
        ({"name": "bleu"}, "unknown reward name 'bleu'; built-ins: exact_match, regex, length"),
        ({"name": "regex"}, "the regex reward needs a 'pattern'"),
        ({"name": "regex", "pattern": "("}, "is not a regular expression"),
        ({"name": "exact_match", "pattern": "x"}, "'pattern' is an option of the regex reward"),
        ({"name": "exact_match", "buffer": 2}, "options of the length reward"),
        ({"name": "length", "buffer": -1}, "buffer must be >= 0"),
        ({"name": "exact_match", "weight": float("nan")}, "weight must be finite"),
    ],
)
def test_bad_reward_configs_are_refused(kw, match):
    with pytest.raises(ConfigError, match=match):
        RewardConfig(**kw)


def test_user_reward_import_errors(tmp_path, monkeypatch):
    mod = _reward_module(tmp_path, monkeypatch, "x = 3\n")
    for path, match in [
        ("no_colon", r"objective.rewards\[0\].function: expected 'module:function'"),
        ("no_such_module_xyz:f", "cannot import 'no_such_module_xyz'"),
        (f"{mod}:missing", "has no attribute 'missing'"),
        (f"{mod}:x", "not callable"),
    ]:
        with pytest.raises(ConfigError, match=match):
            build_rewards([RewardConfig(function=path)], max_new_tokens=4)
    with pytest.raises(ConfigError, match="buffer 9 exceeds max_tokens 4"):
        build_rewards([RewardConfig(name="length", buffer=9)], max_new_tokens=4)


# --- prompt data and rollout rows -----------------------------------------------------------


def test_prompt_rows_strings_and_chat(tmp_path):
    (tmp_path / "chat_template.jinja").write_text(CHAT)
    f = tmp_path / "p.jsonl"
    rows = [
        {"prompt": "add : 1 + 2 =>", "answer": "3", "extra": [1]},
        {"prompt": [{"role": "user", "content": "sort : 2 1"}]},
    ]
    f.write_text("\n".join(json.dumps(r) for r in rows) + "\n\n")
    got = load_prompt_jsonl(f, template_dir=tmp_path)
    assert [p.text for p in got] == ["add : 1 + 2 =>", "<user> sort : 2 1 </s> <assistant>"]
    assert got[0].answer == "3" and got[0].row["extra"] == [1] and got[1].answer is None
    assert got[1].where == f"{f}:2"


@pytest.mark.parametrize(
    "line,kw,match",
    [
        ("{", {}, r"p.jsonl:1: not valid JSON"),
        ('{"text": "x"}', {}, r"p.jsonl:1: expected a 'prompt': a string or a list"),
        ('{"prompt": "x", "answer": 3}', {}, r"p.jsonl:1: expected an 'answer' string, got 3"),
        ('{"prompt": "x"}', {"need_answer": True}, "expected an 'answer' string, got None"),
        ('{"prompt": [{"role": "user", "content": "x"}]}', {}, "needs a chat template"),
        ("", {}, "no prompts"),
    ],
)
def test_bad_prompt_rows_name_the_file_and_line(tmp_path, line, kw, match):
    f = tmp_path / "p.jsonl"
    f.write_text(line + "\n")
    with pytest.raises(ValueError, match=match):
        load_prompt_jsonl(f, template_dir=tmp_path, **kw)


def test_left_padding_and_training_rows_keep_every_token():
    rng = np.random.default_rng(0)
    lengths = np.array([3, 1, 5])
    mask = (np.arange(6)[None] < lengths[:, None]).astype(np.int32)
    ids = np.where(mask > 0, rng.integers(2, 30, mask.shape), 0)
    lids, lmask = left_padded(ids, mask)
    for i, n in enumerate(lengths):
        assert lids[i, 6 - n :].tolist() == ids[i, :n].tolist() and lmask[i].sum() == n
        assert (lids[i, : 6 - n] == 0).all()
    new = np.array([[7, 1, 0, 0], [8, 9, 9, 9], [1, 0, 0, 0]])
    comp, n, truncated = completions(new, eos_id=1)
    assert comp == [[7, 1], [8, 9, 9, 9], [1]] and truncated.tolist() == [False, True, False]
    rows = training_rows(lids, lmask, comp, 4, pad_id=0)
    assert rows["input_ids"].shape == (3, 10)
    for i, k in enumerate(lengths):
        assert rows["input_ids"][i, : k + n[i]].tolist() == ids[i, :k].tolist() + comp[i]
        assert rows["loss_mask"][i].tolist() == [0] * k + [1] * n[i] + [0] * (10 - k - n[i])
        assert rows["attention_mask"][i].sum() == k + n[i]


def test_the_table_shows_the_rollouts_and_no_column_for_a_probe_on_train():
    from jlora.train.io.report import format_summary
    from jlora.train.objectives import GRPO

    head = {"name": "r", "task": "causal_lm", "trainable_params": 1, "base_params": 10,
            "trainable_percent": 10.0, "adapter_bytes": 4, "lora_targets": 1, "steps": 2,
            "wall_time_s": 1.0, "train_time_s": 1.0, "tokens_per_s": 1.0}  # fmt: skip
    after = {"validation": {"exact_match": 0.245, "reward": 0.245, "loss": 1.3}}
    rollouts = {"first steps": {"reward": 0.1387}, "last steps": {"reward": 0.2297}}
    table = format_summary(
        {**head, "before": after, "after": after, "rollouts": rollouts},
        GRPO(None).report_rows({}),
    ).splitlines()
    assert table[2].split() == ["validation", "first", "steps", "last", "steps"]
    reward = next(x for x in table if x.startswith("train reward"))
    assert reward.split()[-3:] == ["-", "0.1387", "0.2297"]
    probe = {"l2": 1.0, "validation": {"accuracy": 0.6}, "train": {"accuracy": 0.9}}
    rows = [("accuracy linear probe", "linear_probe", "accuracy", "")]
    table = format_summary({**head, "after": after, "linear_probe": probe}, rows).splitlines()
    assert table[2].split() == ["validation"]  # the probe's train accuracy adds no column


# --- the objective on a tiny Llama ----------------------------------------------------------

ROOT = Path(__file__).resolve().parents[1]
TOKENIZER = str(ROOT / "data" / "sft-tiny" / "tokenizer.json")
LLAMA = dict(
    model_type="llama", vocab_size=32, hidden_size=16, intermediate_size=32,
    num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=1,
    max_position_embeddings=32, eos_token_id=1, pad_token_id=0,
)  # fmt: skip


def _add_rows(n: int, seed: int) -> list[dict]:
    rng = np.random.default_rng(seed)
    digits = lambda x: " ".join(str(x))  # noqa: E731
    out = []
    for a, b in rng.integers(0, 50, (n, 2)).tolist():
        out.append({"prompt": f"add : {digits(a)} + {digits(b)} =>", "answer": digits(a + b)})
    return out


def _config(tmp_path, objective=None, **sections):
    data = tmp_path / "data"
    if not data.is_dir():
        data.mkdir()
        for name, n, seed in (("train", 16, 0), ("validation", 6, 1)):
            rows = _add_rows(n, seed)
            (data / f"{name}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    raw = {
        "name": "grpo-test",
        "model": {"random": LLAMA, "task": "causal_lm"},
        "objective": {"name": "grpo", "num_generations": 4, "max_new_tokens": 3,
                      **(objective or {})},
        "data": {"source": "jsonl", "path": str(data), "tokenizer": TOKENIZER,
                 "batch_size": 2, "eval_batch_size": 8, "test_split": None},
        "lora": {"rank": 2, "alpha": 4, "targets": ["q_proj", "v_proj", "down_proj"]},
        "optim": {"name": "adamw", "lr": 1e-2, "warmup_steps": 0, "clip_norm": 1.0},
        "train": {"seed": 0, "max_steps": 4, "log_every": 1, "eval_every": 100,
                  "eval_generate": False, "compile_cache_dir": None},
        "output": {"dir": str(tmp_path / "run"), "progress": False, "plot": False,
                   "tensorboard": False},
    }  # fmt: skip
    for k, v in sections.items():
        raw[k] = {**raw.get(k, {}), **v}
    return from_dict(raw)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """The tiny run's config, objective, base params and initial tree (built once)."""
    cfg = _config(tmp_path_factory.mktemp("tiny"))
    return (cfg, *base_tree(cfg))


def _policy(tiny, np_ref, **options):
    """The objective with ``options``, the base params and (frozen, adapters) with random
    non-zero adapters."""
    _, objective, params, tree = tiny
    config = dataclasses.replace(objective.config, **options)
    frozen, adapters = jlora.split(np_ref.randomize(tree, std=0.5))
    return dataclasses.replace(objective, config=config), params, frozen, adapters


def _rows(n: int, seed: int = 0):
    """Rollout rows of random prompts and completions (a few ending with EOS 1)."""
    rng = np.random.default_rng(seed)
    plen = rng.integers(2, 7, n)
    pmask = (np.arange(6)[None] < plen[:, None]).astype(np.int32)
    pids = np.where(pmask > 0, rng.integers(3, 28, (n, 6)), 0)
    comp = [rng.integers(3, 28, rng.integers(1, 4)).tolist() for _ in range(n)]
    comp = [[*c[:-1], 1] if i % 3 == 0 else c for i, c in enumerate(comp)]
    return training_rows(pids, pmask, comp, 3, pad_id=0)


def _np_token_logps(logits, ids):
    x = np.asarray(logits, np.float64)[:, :-1]
    logsm = (
        x
        - np.log(np.exp(x - x.max(-1, keepdims=True)).sum(-1, keepdims=True))
        - x.max(-1, keepdims=True)
    )
    return np.take_along_axis(logsm, np.asarray(ids)[:, 1:, None], -1)[..., 0]


@pytest.mark.slow
def test_beta0_mu1_update_is_reinforce_with_a_group_baseline(tiny, np_ref):
    """One SGD step (lr 1, no clipping) on a rollout batch moves the adapters by minus the
    REINFORCE gradient -1/N Σ_i A_i ∇ mean_t log π(o_it), A_i = r_i - mean(group): computed
    here from the model's log-softmax, without the GRPO loss code."""
    objective, _, frozen, adapters = _policy(
        tiny, np_ref, beta=0.0, num_iterations=1, scale_rewards=False
    )
    rows = _rows(8)
    rewards = np.array([1.0, 0.0, 0.0, 1.0, 0.5, 2.0, 0.0, 0.0])
    adv = (rewards.reshape(2, 4) - rewards.reshape(2, 4).mean(1, keepdims=True)).reshape(-1)
    batch = {**{k: v[None] for k, v in rows.items()}, "advantages": adv[None].astype(np.float32)}
    tx = optax.sgd(1.0)
    new, _, m = jax.jit(make_train_step(objective, tx))(
        adapters, tx.init(adapters), frozen, batch, jax.random.key(0)
    )

    def reinforce(ad):
        logits = jlora.lora(objective.model.apply)(
            {"params": jlora.combine(frozen, ad)}, rows["input_ids"],
            attention_mask=rows["attention_mask"],
        )  # fmt: skip
        logp = jax.nn.log_softmax(logits.astype(jnp.float32), -1)[:, :-1]
        picked = jnp.take_along_axis(logp, rows["input_ids"][:, 1:, None], -1)[..., 0]
        mask = rows["loss_mask"][:, 1:]
        per_seq = (picked * mask).sum(-1) / mask.sum(-1)
        return -jnp.mean(jnp.asarray(adv, jnp.float32) * per_seq)

    grad = jax.jit(jax.grad(reinforce))(adapters)
    assert optax.global_norm(grad) > 1e-3
    moved = jax.tree.map(lambda a, b: a - b, new, adapters)
    chex.assert_trees_all_close(moved, jax.tree.map(jnp.negative, grad), rtol=2e-4, atol=2e-6)
    assert abs(float(m["loss"])) < 1e-6  # at ratio 1 the loss is -mean(A) = 0 per group
    # beta = 0, mu = 1: scoring computes the advantages only (no reference, no old log-probs)
    out = jax.jit(objective.scoring)(adapters, frozen, rows, rewards.astype(np.float32))
    assert set(out) == {"advantages"}
    np.testing.assert_allclose(np.asarray(out["advantages"]), adv, rtol=1e-6)


@pytest.mark.slow
def test_scoring_reference_is_the_base_model_and_the_kl_enters_the_loss(tiny, np_ref):
    """β > 0, μ = 2: the scoring program's reference log-probs are the base model's (plain
    params, no jlora), its old log-probs the adapted model's (merged weights), its advantages
    numpy's; the first update's loss equals the numpy formula (ratio 1: -A + β·k3)."""
    objective, params, frozen, adapters = _policy(
        tiny, np_ref, beta=0.25, num_iterations=2, loss_type="dapo"
    )
    rows = _rows(8, seed=1)
    rewards = np.array([1.0, 0.0, 0.0, 1.0, 0.5, 2.0, 0.0, 0.0], np.float32)
    out = jax.jit(objective.scoring)(adapters, frozen, rows, rewards)
    apply = jax.jit(lambda p: objective.model.apply({"params": p}, rows["input_ids"],
                                                    attention_mask=rows["attention_mask"]))  # fmt: skip
    ref = _np_token_logps(apply(params), rows["input_ids"])
    pol = _np_token_logps(apply(jlora.merge(jlora.combine(frozen, adapters))), rows["input_ids"])
    assert np.abs(ref - pol).max() > 0.05  # the adapters change the model
    np.testing.assert_allclose(np.asarray(out["ref_logps"]), ref, atol=2e-5)
    np.testing.assert_allclose(np.asarray(out["old_logps"]), pol, atol=2e-5)
    r = rewards.reshape(2, 4).astype(np.float64)
    adv = ((r - r.mean(1, keepdims=True)) / (r.std(1, ddof=1, keepdims=True) + 1e-4)).ravel()
    np.testing.assert_allclose(np.asarray(out["advantages"]), adv, rtol=1e-5)
    batch = {**rows, **{k: np.asarray(v) for k, v in out.items()}}
    t = jax.jit(objective.terms)(jlora.combine(frozen, adapters), batch)
    mask = rows["loss_mask"][:, 1:]
    d = ref - pol
    per_token = -adv[:, None] + 0.25 * (np.exp(d) - d - 1)
    want = (per_token * mask).sum() / mask.sum()  # DAPO: token-level
    np.testing.assert_allclose(float(t["loss"] / t["weight"]), want, rtol=2e-5)
    np.testing.assert_allclose(float(t["kl"] / t["completion_tokens"]),
                               ((np.exp(d) - d - 1) * mask).sum() / mask.sum(), rtol=2e-5)  # fmt: skip


@pytest.mark.slow
def test_rollout_batches_are_made_with_the_current_adapters(tmp_path, np_ref):
    """`make_batch`: shapes, group advantages (mean 0 per group), a pure function of (seed,
    step) and the adapters given; host metrics named as the objective logs them."""
    cfg = _config(tmp_path, {"beta": 0.1, "num_iterations": 2}, train={"grad_accum": 2})
    p = prepare(cfg)
    frozen, adapters = jlora.split(np_ref.randomize(p.tree, std=0.5))
    state = types.SimpleNamespace(frozen=frozen, adapters=adapters)
    batch, metrics = p.objective.make_batch(p, 0, state)
    width = p.splits["train"].input_ids.shape[1] + 3
    assert batch["input_ids"].shape == (2, 8, width)
    assert batch["old_logps"].shape == batch["ref_logps"].shape == (2, 8, width - 1)
    np.testing.assert_allclose(batch["advantages"].reshape(4, 4).sum(1), 0, atol=1e-5)
    again, _ = p.objective.make_batch(p, 0, state)
    other, _ = p.objective.make_batch(p, 1, state)
    moved = types.SimpleNamespace(frozen=frozen, adapters=np_ref.randomize(adapters, seed=3))
    third, _ = p.objective.make_batch(p, 0, moved)
    np.testing.assert_array_equal(batch["input_ids"], again["input_ids"])
    assert not np.array_equal(batch["input_ids"], other["input_ids"])
    assert not np.array_equal(batch["old_logps"], third["old_logps"])
    step = {"loss", "clip_fraction", "kl", "update_s"}  # from the jitted step and the engine
    assert set(metrics) == set(p.objective.train_metrics) - step
    assert 1 <= metrics["completion_length"] <= 3 and metrics["rollout_tokens_per_s"] > 0


@pytest.mark.parametrize(
    "objective,sections,match",
    [
        ({"num_generations": 1}, {}, r"objective.num_generations must be >= 2"),
        ({"temperature": 0.0}, {}, r"objective.temperature must be > 0"),
        ({"top_p": 0.0}, {}, r"objective.top_p must be in \(0, 1\]"),
        ({"beta": -1.0}, {}, r"objective.beta must be >= 0"),
        ({"epsilon_low": 1.0}, {}, r"objective.epsilon_low must be in \(0, 1\)"),
        ({"loss_type": "bnpo"}, {}, r"objective.loss_type"),
        ({"rewards": []}, {}, r"objective.rewards: give at least one reward"),
        ({"beta": 0.1}, {"lora": {"trainable": ["lm_head"]}}, r"every trained leaf must be an "),
        ({}, {"data": {"packing": True}}, "data.packing is not supported with objective 'grpo'"),
        ({}, {"data": {"train_shapes": 2}}, r"objective 'grpo' trains on rollouts made by the "),
        ({"rewards": [{"function": "nope_xyz:f"}]}, {}, r"cannot import 'nope_xyz'"),
    ],
)
def test_bad_grpo_configs_are_refused(tmp_path, objective, sections, match):
    with pytest.raises((ConfigError, ValueError, TypeError), match=match):
        _config(tmp_path, objective, **sections)


def test_prompts_past_the_positions_are_refused(tmp_path):
    cfg = _config(tmp_path, {"max_new_tokens": 30})  # 8 or 16 prompt columns + 30 > 32
    objective = base_tree(cfg, shapes_only=True)[0]
    with pytest.raises(ConfigError, match=r"objective.max_new_tokens 30 after prompts of up to "
                       r"\d+ tokens \(padded\) passes the model's max_position_embeddings 32"):  # fmt: skip
        objective.load_data(cfg, 32)


# --- whole runs (slow) ----------------------------------------------------------------------

TIMINGS = {"rollout_s", "update_s", "rollout_tokens_per_s", "tokens_per_s"}
REWARDS = [
    {"name": "exact_match"},
    {"name": "regex", "pattern": r"\d( \d)*", "weight": 0.5},
    {"name": "length", "max_tokens": 3, "buffer": 2, "weight": 0.25},
]


@pytest.fixture(scope="module")
def grpo_run(tmp_path_factory):
    """A 4-step run (μ = 2, β > 0, three rewards; checkpoints at 2 and 4) and the programs
    compiled while each step's batch and update were made."""
    tmp = tmp_path_factory.mktemp("grpo")
    cfg = _config(
        tmp,
        {"rewards": REWARDS, "num_iterations": 2, "beta": 0.1, "temperature": 1.5},
        train={"eval_generate": True},
        checkpoint={"every_steps": 2, "max_to_keep": 3},
        output={"plot": True},
    )
    counts, counter = [], CompileCounter()
    real = TrainingLoop._train_step

    def counted(self, step):
        before = counter.programs
        out = real(self, step)
        counts.append((step, counter.programs - before))
        return out

    jax.clear_caches()  # programs an earlier test compiled in this process are compiled again
    with pytest.MonkeyPatch.context() as mp, counter:
        mp.setattr(TrainingLoop, "_train_step", counted)
        summary = train(cfg, echo=lambda m: None)
    return cfg, summary, counts


@pytest.mark.slow
def test_rollout_scoring_and_update_compile_once(grpo_run):
    _, _, counts = grpo_run
    # step 4 is the health check of the final checkpoint (`jlora.train.engine.guard`)
    assert [s for s, _ in counts] == [0, 1, 2, 3, 4]
    assert counts[0][1] == 3  # the rollout, the scoring and the update programs
    assert [n for _, n in counts[1:]] == [0, 0, 0, 0]


@pytest.mark.slow
def test_a_run_logs_its_rollouts_and_exports(grpo_run, capsys):
    cfg, summary, _ = grpo_run
    out = Path(cfg.output.dir)
    train_records = [r for r in read_metrics(out / "metrics.jsonl") if r["split"] == "train"]
    objective = base_tree(cfg, shapes_only=True)[0]
    names = set(objective.train_metrics)
    assert {"reward/exact_match", "reward/regex_std", "kl", "clip_fraction"} <= names
    assert [r["step"] for r in train_records] == [1, 2, 3, 4]
    for r in train_records:
        assert names <= set(r), names - set(r)
    for when in ("before", "after"):
        assert {"exact_match", "reward", "reward/length", "loss"} <= set(
            summary[when]["validation"]
        )
    assert (out / "loss.png").stat().st_size > 0
    assert json.loads((out / "peft" / "adapter_config.json").read_text())["r"] == 2
    prompt = ["--prompt", "add : 1 2 + 7 =>", "--max-new-tokens", "3"]
    capsys.readouterr()
    assert cli.main(["generate", str(out / "config.yaml"), "--adapter", str(out), *prompt]) == 0
    from_run = capsys.readouterr().out
    assert (
        cli.main(["generate", str(out / "config.yaml"), "--peft", str(out / "peft"), *prompt]) == 0
    )
    assert capsys.readouterr().out == from_run and from_run.strip()


@pytest.mark.slow
def test_a_resumed_run_replays_exactly(grpo_run):
    """Checkpoint step 4 removed, the run resumed from step 2: steps 3 and 4 roll out the same
    completions (keys from (seed, step)) and end on the same adapters, bit for bit."""
    cfg, _, _ = grpo_run
    out = Path(cfg.output.dir)
    ckdir = out / "checkpoints"
    want = export.from_checkpoint(cfg, str(ckdir), step=4)[0]
    logged = {r["step"]: r for r in read_metrics(out / "metrics.jsonl") if r["split"] == "train"}
    shutil.rmtree(ckdir / "4")
    train(cfg, resume=True, echo=lambda m: None)
    got = export.from_checkpoint(cfg, str(ckdir), step=4)[0]
    chex.assert_trees_all_equal(jlora.split(got)[1], jlora.split(want)[1])
    again = {r["step"]: r for r in read_metrics(out / "metrics.jsonl") if r["split"] == "train"}
    for step in (3, 4):
        drop = lambda r: {k: v for k, v in r.items() if k not in TIMINGS}  # noqa: E731
        assert drop(again[step]) == drop(logged[step])
