"""EVA in `jlora train` (`jlora.train.methods.eva`): the ``lora`` section (``init: eva``, the
``lora.eva`` keys), the adapters a run starts from against an independent reference (each
target's inputs read with flax's method interceptor, their padding rows dropped, decomposed and
redistributed in float64 numpy), the checkpointed config, the summary, ``jlora export-peft``
(loaded by the real PEFT) and ``jlora merge`` of an EVA run, a resume that does not run EVA
again, and each error.

Data: a slice of ``data/sft-tiny`` (padded prompt / completion examples). The default tests
parse configs only (no model runs); the slow ones share one prepared run and one uninterrupted
4-step run of a tiny Llama saved by transformers (module fixtures), which PEFT loads too.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from types import SimpleNamespace

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import linen as nn

import jlora
from jlora.core.node import is_node
from jlora.interop.checkpoint import AdapterCheckpointer
from jlora.train import config as C
from jlora.train import train
from jlora.train.engine.resume import OUTPUTS
from jlora.train.engine.setup import prepare
from jlora.train.io.export import from_checkpoint
from jlora.train.methods import lora_section, method_for
from jlora.train.methods.eva import EvaLoraConfig, EvaSection
from jlora.variants.eva import EvaConfig, eva_init

STEPS, BATCHES, RANK, RHO = 4, 3, 4, 2.0
TARGETS = ["q_proj", "o_proj", "down_proj"]  # distinct inputs (q, k, v share theirs): no ties
IDS = np.random.default_rng(0).integers(0, 28, (2, 9))
SFT = Path(__file__).resolve().parent.parent / "data" / "sft-tiny"


@pytest.fixture(scope="module")
def base(tmp_path_factory, hf):
    hf.require("torch")
    path = tmp_path_factory.mktemp("llama")
    hf.tiny_causal_lm().save_pretrained(path, safe_serialization=True)
    return path


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    """64 training examples (8 batches of 8), 8 validation and 8 test ones of ``sft-tiny``."""
    d = tmp_path_factory.mktemp("sft")
    for name, n in (("train", 64), ("validation", 8), ("test", 8)):
        lines = (SFT / f"{name}.jsonl").read_text().splitlines()[:n]
        (d / f"{name}.jsonl").write_text("\n".join(lines) + "\n")
    shutil.copy(SFT / "tokenizer.json", d / "tokenizer.json")
    return d


RANDOM = {  # a random tiny Llama (the default tests: no transformers needed)
    "model_type": "llama", "vocab_size": 128, "hidden_size": 64, "intermediate_size": 96,
    "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
    "max_position_embeddings": 64, "eos_token_id": 1, "pad_token_id": 0,
}  # fmt: skip


def raw_config(base, data, out, lora=None, eva=None, **train) -> dict:
    """A run config; ``base`` is a model directory, or None for the random `RANDOM` Llama."""
    model = {"random": RANDOM} if base is None else {"path": str(base)}
    return {
        "name": "eva",
        "model": {**model, "task": "causal_lm"},
        "data": {
            "source": "jsonl",
            "path": str(data),
            "tokenizer": str(data / "tokenizer.json"),
            "max_len": 32,
            "batch_size": 8,
            "eval_batch_size": 8,
        },
        "lora": {
            "init": "eva",
            "rank": RANK,
            "alpha": 8,
            "targets": TARGETS,
            "eva": {"batches": BATCHES, "rho": RHO, **(eva or {})},
            **(lora or {}),
        },
        "optim": {"lr": 2e-2, "warmup_steps": 1, "weight_decay": 0.0},
        "train": {
            "max_steps": STEPS,
            "eval_every": STEPS,
            "log_every": 2,
            "eval_before": False,
            **train,
        },
        "checkpoint": {"every_steps": 1, "max_to_keep": 10},
        "output": {"dir": str(out), "progress": False},
    }


@pytest.fixture(scope="module")
def ref_run(base, data, tmp_path_factory):
    out = tmp_path_factory.mktemp("eva") / "run"
    cfg = C.from_dict(raw_config(base, data, out))
    lines: list[str] = []
    summary = train(cfg, echo=lines.append)
    return cfg, out, summary, lines


def restore(cfg, out, step):
    """``(tree, opt_state, lora config)`` of checkpoint ``step`` of a run of ``cfg``."""
    tree, lcfg, got = from_checkpoint(cfg, out / "checkpoints", step=step)
    assert got == step
    return tree, lcfg


# --- the independent reference ------------------------------------------------------------


def dense_inputs(model, params, batch) -> dict[str, np.ndarray]:
    """``{kernel path: (batch, seq, in)}``: what each ``nn.Dense`` of the model receives, read by
    flax's method interceptor (no jlora in the way)."""

    def run(params, ids, mask):
        got = {}

        def grab(next_fun, args, kwargs, ctx):
            if isinstance(ctx.module, nn.Dense) and ctx.method_name == "__call__":
                got["/".join(ctx.module.scope.path) + "/kernel"] = args[0]
            return next_fun(*args, **kwargs)

        with nn.intercept_methods(grab):
            model.apply({"params": params}, ids, attention_mask=mask)
        return got

    out = jax.jit(run)(params, batch["input_ids"], batch["attention_mask"])
    return {k: np.asarray(v, np.float64) for k, v in out.items()}


def reference_eva(p, n_batches, rank, rho, alpha):
    """EVA by hand: the first ``n_batches`` batches of the run's training order, each target's
    rows at real tokens, centered and eigen-decomposed in float64; the best ``Σ r`` explained
    variance ratios among each target's top ``round(r·ρ)`` get the ranks. ``{path: (rank, a,
    alpha)}`` (rank 0: dropped)."""
    split, batcher = p.splits["train"], p.batcher
    parts = [split.take(batcher.indices(i)) for i in range(n_batches)]
    # the examples of the batches side by side: one forward (each example attends to itself)
    b = {k: np.concatenate([x[k] for x in parts]) for k in ("input_ids", "attention_mask")}
    mask = b["attention_mask"].astype(bool)
    assert all(m[: m.sum()].all() for m in mask)  # right padding: real tokens come first
    rows = {k: x[mask] for k, x in dense_inputs(p.objective.model, p.params, b).items()}
    targets = [s for s in rows if s.split("/")[-2] in TARGETS]
    offers, vecs = [], {}
    for s in targets:
        x = rows[s]
        c = x - x.mean(axis=0)
        ev, v = np.linalg.eigh(c.T @ c)
        ev, v = ev[::-1], v[:, ::-1]
        vecs[s] = v
        offers += [(r, s) for r in (ev / ev.sum())[: round(rank * rho)]]
    best = [s for _, s in sorted(offers, reverse=True)[: rank * len(targets)]]
    return {
        s: (best.count(s), vecs[s][:, : best.count(s)], alpha * best.count(s) / rank)
        for s in targets
    }


@pytest.fixture(scope="module")
def prepared(base, data, tmp_path_factory):
    """The run of the slow tests, prepared (model, data, training order), and what its
    method's `Eva.initialize` gives."""
    p = prepare(C.from_dict(raw_config(base, data, tmp_path_factory.mktemp("run"))))
    return p, method_for(p.cfg.lora).initialize(p)


@pytest.fixture(scope="module")
def reference(prepared):
    return reference_eva(prepared[0], BATCHES, RANK, RHO, 8.0)


def node_at(tree, path):
    for part in path.split("/"):
        tree = tree[part]
    return tree


def assert_matches_reference(tree, lcfg, reference, *, b_zero=True) -> float:
    """Ranks, α, scales and ``a`` (up to each vector's sign) of ``tree`` / its config against
    `reference_eva` (and ``b = 0``). Returns the largest ``|a - reference a|``."""
    assert type(lcfg) is jlora.LoraConfig and lcfg.init == "eva" and lcfg.rank == RANK
    ranks = {s: r for s, (r, _, _) in reference.items()}
    assert sorted(ranks.values()) != [RANK] * len(ranks)  # the budget moved
    assert sum(ranks.values()) == RANK * len(ranks)
    worst = 0.0
    for s, (r, a_ref, alpha) in reference.items():
        node = node_at(tree, s)
        if r == 0:
            assert not isinstance(node, jlora.LoraWeight), s  # dropped: the plain kernel
            continue
        assert node.rank == r and lcfg.rank_for(s) == r and lcfg.alpha_for(s) == alpha, s
        assert node.scale == pytest.approx(alpha / r)
        assert not (b_zero and np.any(np.asarray(node.b))), s
        a = np.asarray(node.a, np.float64)
        a = a * np.sign(np.sum(a * a_ref, axis=0))  # singular vectors: up to their sign
        worst = max(worst, float(np.abs(a - a_ref).max()))
    assert worst <= 2e-5
    return worst


# --- the lora section -----------------------------------------------------------------------


def test_init_eva_parses_with_defaults_and_round_trips(data, tmp_path):
    cfg = C.from_dict(raw_config(None, data, tmp_path))
    assert type(cfg.lora) is EvaLoraConfig and cfg.lora.init == "eva"
    assert cfg.lora.eva == EvaSection(batches=BATCHES, rho=RHO)
    assert C.from_dict(C.to_dict(cfg)) == cfg  # config.yaml reads back
    raw = raw_config(None, data, tmp_path)
    del raw["lora"]["eva"]  # the section is optional: PEFT's defaults, 4 batches
    defaults = C.from_dict(raw).lora.eva
    assert (defaults.rho, defaults.whiten, defaults.adjust_scaling_factors, defaults.batches) == (
        2.0, False, True, 4)  # fmt: skip


@pytest.mark.parametrize(
    ("lora", "eva", "error", "message"),
    [
        ({}, {"rho": 0.5}, ValueError, r"^lora.eva: `rho` must be a number >= 1, got 0.5\.$"),
        ({}, {"batches": 0}, ValueError, r"^lora.eva: `batches` must be an integer >= 1, got 0"),
        ({}, {"whiten": "yes"}, TypeError, r"^lora.eva: `whiten` must be true or false, got 'yes'"),
        ({}, {"tau": 0.9}, C.ConfigError,
         r"^unknown key 'lora.eva.tau'; valid keys in 'lora.eva': rho, whiten, "
         r"adjust_scaling_factors, batches$"),
        ({"variant": "dora"}, {}, C.ConfigError,
         r"^lora.init: eva sets plain LoRA adapters from data; lora.variant 'dora' cannot take "
         r"it"),
        ({"init": "kaiming"}, {}, C.ConfigError,
         r"^lora.eva is an EVA field: set lora.init: eva \(or remove eva\)$"),
        ({"method": "adalora", "init_r": 4}, {}, C.ConfigError,
         r"^lora.eva is an EVA field: set lora.init: eva"),
        ({"method": "adalora", "init_r": 4}, None, C.ConfigError,
         r"^lora.init \('eva'\): AdaLoRA has its own init"),
    ],
)  # fmt: skip
def test_lora_section_errors(data, tmp_path, lora, eva, error, message):
    raw = raw_config(None, data, tmp_path, lora, eva)
    if eva is None:
        del raw["lora"]["eva"]
    with pytest.raises(error, match=message):
        C.from_dict(raw)


class NoMask:
    """An objective whose batches (1 step of 2 examples) have no attention mask."""

    def train_batch(self, p, step):
        return {"input_ids": np.zeros((1, 2, 5), np.int32)}


def test_initialize_errors_before_the_model_runs():
    """The checks of `Eva.initialize` read only the run's data (a stand-in run here)."""
    lora = lora_section({"init": "eva", "rank": RANK, "targets": TARGETS, "eva": {"batches": 9}})
    p = SimpleNamespace(
        batcher=SimpleNamespace(steps_per_epoch=8),
        splits={"train": range(64)},
        cfg=SimpleNamespace(data=SimpleNamespace(batch_size=8)),
        objective=NoMask(),
    )
    with pytest.raises(C.ConfigError, match=(
        r"^lora.eva.batches \(9\) exceeds the 8 batches of data.batch_size 8 in one epoch of the "
        r"64 training examples: EVA reads distinct batches of the first epoch; lower it$")):  # fmt: skip
        method_for(lora).initialize(p)
    lora = lora_section({"init": "eva", "rank": RANK, "targets": TARGETS, "eva": {"batches": 2}})
    with pytest.raises(C.ConfigError, match=(
        r"^lora.init: eva leaves the padding out by the batches' attention_mask; the batches of "
        r"NoMask have none \(keys: input_ids\)$")):  # fmt: skip
        method_for(lora).initialize(p)


# --- the method on a prepared run (slow: a tiny Llama saved by transformers) -------------------


@pytest.mark.slow
def test_eva_of_the_method_equals_the_reference(prepared, reference):
    """`Eva.initialize` on the prepared run = EVA by hand on the first 3 batches of its training
    order (padding rows left out); the model is unchanged (b = 0: merge gives W back)."""
    p, (tree, lcfg) = prepared
    worst = assert_matches_reference(tree, lcfg, reference)
    print(f"max |a - reference a| {worst:.1e}")
    chex.assert_trees_all_equal(jlora.merge(tree), p.params)
    assert p.tree is not tree and type(p.cfg.lora) is EvaLoraConfig  # the prepared run is kept


@pytest.mark.slow
def test_eva_init_by_hand_equals_the_method(prepared):
    """`jlora.variants.eva.eva_init` called by hand on the run's first 3 batches, with the
    model's forward (not the objective's loss) and their attention masks."""
    p, (tree, lcfg) = prepared
    batches = [p.splits["train"].take(p.batcher.indices(i)) for i in range(BATCHES)]
    model = p.objective.model

    def fwd(t, b):
        return model.apply({"params": t}, b["input_ids"], attention_mask=b["attention_mask"])

    plain = jlora.LoraConfig(rank=RANK, alpha=8, targets=TARGETS, init="eva")
    by_hand, cfg = eva_init(jlora.init(p.params, plain, key=jax.random.key(0)), fwd,
                            [(b,) for b in batches], plain, EvaConfig(rho=RHO),
                            masks=[b["attention_mask"] for b in batches])  # fmt: skip
    assert cfg == lcfg
    chex.assert_trees_all_close(jlora.split(by_hand)[1], jlora.split(tree)[1], atol=1e-6)


@pytest.mark.slow
def test_more_batches_than_an_epoch_is_refused_before_anything_is_written(base, data, tmp_path):
    out = tmp_path / "run"
    cfg = C.from_dict(raw_config(base, data, out, eva={"batches": 9}))
    with pytest.raises(C.ConfigError, match=(
        r"^lora.eva.batches \(9\) exceeds the 8 batches of data.batch_size 8 in one epoch of the "
        r"64 training examples: EVA reads distinct batches of the first epoch; lower it$")):  # fmt: skip
        train(cfg, echo=lambda m: None)
    assert not out.exists() or not any(out.iterdir())


# --- a run (slow) ---------------------------------------------------------------------------


@pytest.mark.slow
def test_run_starts_from_the_reference_eva(ref_run, reference):
    """The adapters of the step-1 checkpoint: ``a`` is EVA's (its gradient is 0 while b = 0, so
    the first step leaves it as EVA set it), ranks and α as the reference gives them, and the
    saved config is plain LoRA with EVA's targets / rank_pattern / alpha_pattern."""
    cfg, out, summary, _ = ref_run
    tree, lcfg = restore(cfg, out, 1)
    ranks = {s: r for s, (r, _, _) in reference.items()}
    worst = assert_matches_reference(tree, lcfg, reference, b_zero=False)  # b took a step
    print(f"max |a - reference a| {worst:.1e}")
    assert summary["eva"]["ranks"] == ranks and summary["eva"]["budget"] == RANK * len(ranks)
    assert summary["eva"]["dropped"] == [s for s, r in ranks.items() if r == 0]
    sizes = {"q_proj": 64 + 64, "o_proj": 64 + 64, "down_proj": 96 + 64}  # in + out
    assert summary["adapter_params"] == sum(r * sizes[s.split("/")[-2]] for s, r in ranks.items())
    assert "initialize_s" in summary["timings_s"]


@pytest.mark.slow
def test_checkpoints_hold_the_eva_config_and_the_log_says_so(ref_run):
    cfg, out, _, lines = ref_run
    with AdapterCheckpointer(out / "checkpoints") as ckpt:
        configs = {ckpt.config(s) for s in ckpt.all_steps()}
        assert ckpt.all_steps() == list(range(1, STEPS + 1))
    assert len(configs) == 1  # the same redistributed config at every step
    assert any(x.startswith("[jlora] EVA (3 batches, rho 2): ranks ") for x in lines)
    written = C.load_config(out / "config.yaml")  # the run's config as given: init eva
    assert written.lora == cfg.lora


@pytest.mark.slow
def test_resume_replays_exactly_without_running_eva_again(
    base, data, ref_run, tmp_path, monkeypatch
):
    """The run killed after its step-2 checkpoint resumes onto the checkpoint's redistributed
    shapes (EVA is not run again: it would raise here) and ends bit for bit where the
    uninterrupted run did."""
    import jlora.train.methods.eva as eva_method

    cfg_ref, ref_out, _, _ = ref_run
    out = tmp_path / "run"
    shutil.copytree(ref_out, out)
    for step in (3, 4):
        shutil.rmtree(out / "checkpoints" / str(step))
    for name in OUTPUTS:
        if name != "metrics.jsonl":
            (out / name).unlink(missing_ok=True)

    def no_eva(*args, **kwargs):
        raise AssertionError("EVA ran again on resume")

    monkeypatch.setattr(eva_method, "eva_init", no_eva)
    cfg = C.from_dict(raw_config(base, data, out))
    lines: list[str] = []
    summary = train(cfg, resume=True, echo=lines.append)
    assert any("resumed from step 2" in x for x in lines)
    assert "initialize_s" not in summary["timings_s"]
    for step in (3, 4):
        (got, got_cfg), (want, want_cfg) = restore(cfg, out, step), restore(cfg_ref, ref_out, step)
        assert got_cfg == want_cfg
        for a, b in zip(jax.tree.leaves(jlora.split(got)[1]), jax.tree.leaves(jlora.split(want)[1]),
                        strict=True):  # fmt: skip
            np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    with (
        AdapterCheckpointer(out / "checkpoints") as a,
        AdapterCheckpointer(ref_out / "checkpoints") as b,
    ):
        assert a.nbytes(STEPS) > 0 and a.metrics(STEPS) == b.metrics(STEPS)
    rows = lambda d: [  # noqa: E731
        {k: v for k, v in json.loads(x).items() if k != "tokens_per_s"}
        for x in (d / "metrics.jsonl").read_text().splitlines()
    ]
    assert rows(out) == rows(ref_out)


@pytest.mark.slow
def test_resume_of_a_checkpoint_eva_did_not_make_is_refused(base, data, ref_run, tmp_path):
    """Resuming with another alpha: the saved config is not EVA's of this section."""
    _, ref_out, _, _ = ref_run
    out = tmp_path / "run"
    shutil.copytree(ref_out, out)
    cfg = C.from_dict(raw_config(base, data, out, {"alpha": 16}))
    with pytest.raises(C.ConfigError, match=(
        r"^--resume: the checkpoint's LoRA config is not the one EVA made from this run's lora "
        r"section \(it differs in lora.alpha\)")):  # fmt: skip
        train(cfg, resume=True, echo=lambda m: None)


# --- exports --------------------------------------------------------------------------------


def _jlora_logits(base, tree):
    model, _ = jlora.models.from_pretrained(base)
    forward = jlora.lora(lambda t, ids: model.apply({"params": t}, ids))
    return np.asarray(jax.jit(forward)(tree, jnp.asarray(IDS)))


def _peft_model(base, peft_dir):
    import peft
    import transformers

    hf_model = transformers.AutoModelForCausalLM.from_pretrained(base, attn_implementation="eager")
    return peft.PeftModel.from_pretrained(hf_model, str(peft_dir)).eval()


def _peft_logits(pm):
    import torch

    with torch.no_grad():
        return pm(torch.from_numpy(IDS).long()).logits.numpy()


@pytest.mark.slow
def test_export_peft_of_an_eva_run_loads_in_peft(base, data, ref_run, tmp_path, require):
    require("peft")
    from jlora.cli import main

    cfg, out, summary, _ = ref_run
    tree, _ = restore(cfg, out, STEPS)
    want = _jlora_logits(base, tree)
    peft_dir = tmp_path / "peft"
    config = tmp_path / "eva.yaml"
    config.write_text(json.dumps(raw_config(base, data, out)))  # JSON is YAML
    rc = main(["export-peft", str(config), "--checkpoint", str(out / "checkpoints"),
               "--out", str(peft_dir)])  # fmt: skip
    assert rc == 0
    saved = json.loads((peft_dir / "adapter_config.json").read_text())
    name = lambda s: jlora.peft.torch_module_name(s.removesuffix("/kernel"))  # noqa: E731
    ranks = {name(s): r for s, r in summary["eva"]["ranks"].items() if r}
    assert saved["r"] == RANK and saved["init_lora_weights"] is True
    for what, d in (("export-peft", peft_dir), ("the run's", out / "peft")):
        pm = _peft_model(base, d)
        layers = {n: m for n, m in pm.base_model.model.named_modules() if hasattr(m, "lora_A")}
        assert {n: m.r["default"] for n, m in layers.items()} == ranks  # PEFT built EVA's ranks
        for n, m in layers.items():  # and scales: α follows the rank, α/r stays 8 / RANK
            assert m.scaling["default"] == pytest.approx(8 / RANK), n
        diff = float(np.max(np.abs(_peft_logits(pm) - want)))
        print(f"{what}: max |PEFT logits - jlora logits| {diff:.2e}")
        assert diff <= 1e-5


@pytest.mark.slow
def test_merge_of_an_eva_run_is_w_plus_the_update(base, data, ref_run, tmp_path):
    import safetensors.numpy

    from jlora.cli import main

    cfg, out, _, _ = ref_run
    tree, _ = restore(cfg, out, STEPS)
    config = tmp_path / "eva.yaml"
    config.write_text(json.dumps(raw_config(base, data, out)))
    rc = main(["merge", str(config), "--checkpoint", str(out / "checkpoints"),
               "--out", str(tmp_path / "m"), "--format", "flax"])  # fmt: skip
    assert rc == 0
    got = safetensors.numpy.load_file(tmp_path / "m" / "model.safetensors")
    n = 0
    for p, x in jax.tree_util.tree_flatten_with_path(tree, is_leaf=is_node)[0]:
        if isinstance(x, jlora.LoraWeight):
            a, b, w = (np.asarray(v, np.float64) for v in (x.a, x.b, x.w))
            path = jlora.path_str(p)
            np.testing.assert_allclose(got[path], w + x.scale * a @ b, rtol=1e-5, atol=1e-6,
                                       err_msg=path)  # fmt: skip
            n += 1
    assert n == sum(1 for r in ref_run[2]["eva"]["ranks"].values() if r)
