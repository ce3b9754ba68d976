"""AdaLoRA in `jlora train` (`jlora.train.methods.adalora`): the ``lora`` section (``method: adalora``),
the train step (orthogonal regularizer, allocator after the update, accumulated gradients), the
carried allocator state through checkpoints and an exact resume, the summary / ranks PNG, and
``jlora export-peft`` / ``jlora merge`` of an AdaLoRA run (the export loaded by the real PEFT).

One uninterrupted 8-step run on a tiny random Llama saved to disk (a module fixture) is shared.
"""

from __future__ import annotations

import dataclasses
import json
import math
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import jlora
from jlora.interop.checkpoint import AdapterCheckpointer
from jlora.interop.config_json import config_from_json, config_to_json
from jlora.train import config as C
from jlora.train import train
from jlora.train.engine.resume import OUTPUTS
from jlora.train.engine.setup import prepare
from jlora.train.engine.steps import make_optimizer, make_schedule, make_train_step
from jlora.train.io.export import from_checkpoint
from jlora.train.methods import AdaLoraTrainState, PendingAdaLoraConfig, init_opt_state, method_for
from jlora.variants import adalora_alloc as alloc
from jlora.variants.adalora import AdaLoraConfig

STEPS = 8
SCHED = {"init_r": 4, "target_r": 2, "tinit": 1, "tfinal": 2, "deltaT": 2}
TARGETS = ["q_proj", "v_proj", "down_proj"]  # 3 per layer, 2 layers: 6 targets
IDS = np.random.default_rng(0).integers(0, 128, (2, 9))


@pytest.fixture(scope="module")
def base(tmp_path_factory, hf):
    hf.require("torch")
    path = tmp_path_factory.mktemp("llama")
    hf.tiny_causal_lm().save_pretrained(path, safe_serialization=True)
    return path


def raw_config(base, out, lora=None, **train) -> dict:
    return {
        "name": "ada",
        "model": {"path": str(base), "task": "causal_lm"},
        "data": {
            "source": "synthetic",
            "synthetic": {"num_train": 96, "num_eval": 8, "num_test": 8, "seq_len": 10},
            "batch_size": 8,
            "eval_batch_size": 8,
        },
        "lora": {
            "method": "adalora",
            "alpha": 8,
            "targets": TARGETS,
            "dropout": 0.1,
            "orth_reg_weight": 0.3,
            **SCHED,
            **(lora or {}),
        },
        "optim": {"lr": 2e-2, "warmup_steps": 2, "clip_norm": 1.0},
        "train": {
            "max_steps": STEPS,
            "eval_every": STEPS,
            "log_every": 2,
            "grad_accum": 2,
            "eval_before": False,
            **train,
        },
        "checkpoint": {"every_steps": 4, "max_to_keep": 5},
        "output": {"dir": str(out), "progress": False},
    }


def opt_template(cfg):
    """A fresh optimizer state of the run (the template to restore a checkpoint's)."""
    p = prepare(cfg)
    _, adapters = jlora.split(p.tree)
    tx = make_optimizer(p.cfg.optim, make_schedule(p.cfg.optim, p.total_steps), adapters)
    return p, init_opt_state(tx, adapters, p.cfg.lora)


_TEMPLATES: dict = {}


def restore(cfg, out, step=None):
    """``(tree, opt_state, step, lora config)`` of a checkpoint of a run of ``cfg``."""
    key = repr(dataclasses.replace(cfg, output=C.OutputConfig()))  # all but the output dir
    if key not in _TEMPLATES:
        _TEMPLATES[key] = opt_template(cfg)
    p, template = _TEMPLATES[key]
    with AdapterCheckpointer(out / "checkpoints") as ckpt:
        tree, opt, got = ckpt.restore(p.tree, opt_state=template, step=step)
        saved_cfg = ckpt.config(got)
    return tree, opt, got, saved_cfg


@pytest.fixture(scope="module")
def ref_run(base, tmp_path_factory):
    out = tmp_path_factory.mktemp("ada") / "run"
    cfg = C.from_dict(raw_config(base, out))
    summary = train(cfg, echo=lambda m: None)
    return cfg, out, summary


# --- the lora section -----------------------------------------------------------------------


def test_method_adalora_parses_round_trips_and_defaults_total_step(base, tmp_path):
    cfg = C.from_dict(raw_config(base, tmp_path))
    assert type(cfg.lora) is PendingAdaLoraConfig and cfg.lora.total_step is None
    assert (cfg.lora.rank, cfg.lora.init_r, cfg.lora.variant) == (4, 4, "adalora")
    assert C.from_dict(C.to_dict(cfg)) == cfg  # config.yaml reads back (total_step: null)
    # `variant: adalora` is the same section; an explicit total_step gives an AdaLoraConfig.
    raw = raw_config(base, tmp_path, {"total_step": 20})
    raw["lora"]["variant"] = raw["lora"].pop("method")
    explicit = C.from_dict(raw).lora
    assert type(explicit) is AdaLoraConfig and explicit.total_step == 20
    # total_step defaults to the run's optimizer steps (train.max_steps here, else epochs).
    assert prepare(cfg).cfg.lora == dataclasses.replace(explicit, total_step=STEPS)
    by_epochs = C.from_dict(raw_config(base, tmp_path, max_steps=None, epochs=2))
    assert prepare(by_epochs).cfg.lora.total_step == 2 * (96 // 8 // 2)


@pytest.mark.parametrize(
    ("lora", "error", "message"),
    [
        ({"init_rr": 3}, C.ConfigError,
         r"^unknown key 'lora.init_rr' \(did you mean 'init_r'\?\); valid keys in 'lora': rank, "
         r"alpha, .*variant, method, use_dora, init_r, target_r, tinit, tfinal, deltaT, beta1, beta2, "
         r"orth_reg_weight, total_step, eva, d_initial, projection_prng_key, save_projection, loftq_iter, "
         r"loftq_bits, block_size$"),
        ({"method": "lora"}, C.ConfigError,
         r"^lora.orth_reg_weight is an AdaLoRA field: set lora.method: adalora \(or remove "
         r"orth_reg_weight, init_r, target_r, tinit, tfinal, deltaT\)$"),
        ({"variant": "dora"}, C.ConfigError,
         r"^lora.method \('adalora'\) and lora.variant \('dora'\) disagree"),
        ({"method": 3}, TypeError, r"^lora.method: expected str, got int 3$"),
        ({"rank": 8}, C.ConfigError,
         r"^lora.rank \(8\) differs from lora.init_r \(4\): AdaLoRA's initial rank is "
         r"lora.init_r; remove lora.rank$"),
        ({"init": "kaiming"}, C.ConfigError, r"^lora.init \('kaiming'\): AdaLoRA has its own"),
        ({"target_r": 5}, ValueError, r"^lora: `target_r` \(5\) must not exceed `init_r` \(4\)"),
        ({"beta1": 1.5}, ValueError, r"^lora: `beta1` must be in \(0, 1\), got 1.5"),
        ({"deltaT": 0}, ValueError, r"^lora: `deltaT` must be an integer >= 1, got 0"),
        ({"total_step": 3}, ValueError,
         r"^lora: AdaLoRA needs tinit < total_step - tfinal \(a budgeting phase\), got tinit=1, "
         r"tfinal=2, total_step=3"),
    ],
)  # fmt: skip
def test_lora_section_errors(base, tmp_path, lora, error, message):
    with pytest.raises(error, match=message):
        C.from_dict(raw_config(base, tmp_path, lora))


def test_tinit_and_tfinal_beyond_the_run_steps_are_refused(base, tmp_path):
    cfg = C.from_dict(raw_config(base, tmp_path, {"tinit": 5, "tfinal": 3}))
    with pytest.raises(C.ConfigError, match=(
        r"^lora.tinit \(5\) \+ lora.tfinal \(3\) must be less than the run's 8 optimizer steps "
        r"\(lora.total_step defaults to them\)")):  # fmt: skip
        prepare(cfg)


# --- the train step -------------------------------------------------------------------------


def test_train_step_is_the_manual_adalora_step_on_the_accumulated_gradient(base, tmp_path):
    """Two micro-batches through `make_train_step` = one hand-written step on the whole batch:
    grad of (mean loss + orth_reg_weight · regularizer), AdamW, then the allocator with that
    gradient at the carried step (here a reallocation step, which zeroes some Λ)."""
    cfg = C.from_dict(raw_config(base, tmp_path, {"dropout": 0.0, "tinit": 0}))
    p = prepare(cfg)
    lcfg = p.cfg.lora
    frozen, ad = jlora.split(p.tree)
    tx = optax.adamw(1e-2)
    state = init_opt_state(tx, ad, lcfg)
    state = dataclasses.replace(state, step=jnp.asarray(2, jnp.int32))  # a reallocation step
    rng = np.random.default_rng(1)
    ids = rng.integers(0, 128, (2, 4, 10))
    mask = np.ones_like(ids)
    mask[1, 2, 7:] = 0  # padding in one micro-batch: the mean is token-weighted
    batch = {"input_ids": jnp.asarray(ids), "attention_mask": jnp.asarray(mask)}
    step = jax.jit(make_train_step(p.objective, tx, method_for(lcfg)))
    got_ad, got_state, m = step(ad, state, frozen, batch, jax.random.key(0))

    whole = jax.tree.map(lambda x: x.reshape(-1, *x.shape[2:]), batch)

    def loss_fn(a):
        t = p.objective.terms(jlora.combine(frozen, a), whole)
        ce = t["loss"] / jnp.sum(p.objective.weights(whole))
        return ce + lcfg.orth_reg_weight * alloc.orth_regularizer(a), ce

    @jax.jit
    def reference(ad, state):
        (_, ce), g = jax.value_and_grad(loss_fn, has_aux=True)(ad)
        upd, opt = tx.update(g, state.opt, ad)
        new = optax.apply_updates(ad, upd)
        return ce, opt, *alloc.update_and_allocate(new, g, state.alloc, 2, lcfg)

    ce, opt, want_ad, want_alloc, budget = reference(ad, state)
    by_hand = math.floor((24 - 12) * (1 - 2 / (STEPS - 2)) ** 3 + 12)  # PEFT's cubic schedule
    assert int(m["budget"]) == int(budget) == by_hand == 15 and int(got_state.step) == 3
    np.testing.assert_allclose(float(m["loss"]), float(ce), rtol=1e-5)
    assert sum(int(v.sum()) for v in got_state.alloc.mask.values()) == by_hand
    for a, b in zip(jax.tree.leaves((got_ad, got_state.opt, got_state.alloc)),
                    jax.tree.leaves((want_ad, opt, want_alloc)), strict=True):  # fmt: skip
        np.testing.assert_allclose(np.asarray(a, np.float64), np.asarray(b, np.float64),
                                   rtol=2e-4, atol=1e-6)  # fmt: skip
    for s, keep in got_state.alloc.mask.items():  # dropped triplets have Λ = 0
        e = alloc.adalora_targets(got_ad)[s].e
        assert np.all(np.asarray(e)[~np.asarray(keep)] == 0)


# --- a whole run ----------------------------------------------------------------------------


def _budget(t, init_bgt, target_bgt):
    """PEFT's cubic budget schedule, by hand in float64 (the scheduled count at step t)."""
    tinit, tfinal, deltaT = SCHED["tinit"], SCHED["tfinal"], SCHED["deltaT"]
    if t <= tinit:
        return init_bgt
    if t > STEPS - tfinal:
        return target_bgt
    mul = 1 - (t - tinit) / (STEPS - tfinal - tinit)
    del deltaT
    return math.floor((init_bgt - target_bgt) * mul**3 + target_bgt)


def test_run_reports_final_ranks_budget_and_png(ref_run):
    cfg, out, s = ref_run
    ada = s["adalora"]
    tree, opt, step, _ = restore(cfg, out)
    assert step == STEPS and isinstance(opt, AdaLoraTrainState) and int(opt.step) == STEPS
    # Ranks = kept triplets of the checkpointed mask; final budget target_r × 6 targets.
    assert ada["ranks"] == {k: int(np.sum(v)) for k, v in opt.alloc.mask.items()}
    assert len(ada["ranks"]) == 6 and ada["budget_initial"] == 24
    assert ada["budget_final"] == sum(ada["ranks"].values()) == ada["budget_target"] == 12
    # After the final reallocation the dropped Λ are exactly 0, the kept ones not.
    for path, node in alloc.adalora_targets(tree).items():
        np.testing.assert_array_equal(np.asarray(node.e) != 0, np.asarray(opt.alloc.mask[path]))
    # Final trainable params: k·(in + out + 1) per target (q 64→64, v 64→32, down 96→64).
    sizes = {"q_proj": 64 + 64, "v_proj": 64 + 32, "down_proj": 96 + 64}
    by_hand = sum(r * (sizes[p.split("/")[-2]] + 1) for p, r in ada["ranks"].items())
    assert ada["final_trainable_params"] == ada["final_adapter_params"] == by_hand
    assert s["trainable_params"] == sum(4 * (v + 1) for v in sizes.values()) * 2
    # The logged budget follows PEFT's schedule at each logged step (budget of step t - 1).
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    logged = {r["step"]: r["adalora_budget"] for r in rows if r["split"] == "train"}
    assert logged == {t: _budget(t - 1, 24, 12) for t in range(2, STEPS + 1, 2)}
    import matplotlib.image

    png = matplotlib.image.imread(out / "adalora_ranks.png")
    assert ada["ranks_png"] == str(out / "adalora_ranks.png") and png.shape[0] > 100


@pytest.mark.slow
def test_resume_continues_exactly(base, ref_run, tmp_path):
    """The uninterrupted run with its step-8 checkpoint and outputs removed (a run killed after
    the step-4 checkpoint, mid-budget) resumes: the step-8 adapters, optimizer state, allocator
    statistics, masks and step counter equal the uninterrupted run's, bit for bit."""
    cfg_ref, ref_out, _ = ref_run
    out = tmp_path / "run"
    shutil.copytree(ref_out, out)
    shutil.rmtree(out / "checkpoints" / str(STEPS))
    for name in OUTPUTS:
        if name != "metrics.jsonl":
            (out / name).unlink(missing_ok=True)
    cfg = C.from_dict(raw_config(base, out))
    lines = []
    train(cfg, resume=True, echo=lines.append)
    assert any("resumed from step 4" in x for x in lines)
    got, want = restore(cfg, out), restore(cfg_ref, ref_out)
    assert got[2] == want[2] == STEPS and got[3] == want[3]
    assert isinstance(got[1], AdaLoraTrainState) and int(got[1].step) == STEPS
    leaves = jax.tree.leaves((jlora.split(got[0])[1], got[1]))
    ref_leaves = jax.tree.leaves((jlora.split(want[0])[1], want[1]))
    assert len(leaves) == len(ref_leaves) > 40
    for a, b in zip(leaves, ref_leaves, strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    rows = lambda d: [  # noqa: E731
        {k: v for k, v in json.loads(x).items() if k != "tokens_per_s"}
        for x in (d / "metrics.jsonl").read_text().splitlines()
    ]
    assert rows(out) == rows(ref_out)


def test_checkpoint_config_json_keeps_the_adalora_fields(ref_run):
    cfg, out, _ = ref_run
    *_, saved = restore(cfg, out)
    assert type(saved) is AdaLoraConfig
    want = {**SCHED, "total_step": STEPS, "orth_reg_weight": 0.3, "beta1": 0.85, "alpha": 8.0}
    assert {k: getattr(saved, k) for k in want} == want
    assert config_from_json(json.loads(json.dumps(config_to_json(saved)))) == saved


def _jlora_logits(base, tree):
    model, _ = jlora.models.from_pretrained(base)
    forward = jlora.lora(lambda t, ids: model.apply({"params": t}, ids))
    return np.asarray(jax.jit(forward)(tree, jnp.asarray(IDS)))


def _peft_logits(base, peft_dir):
    import peft
    import torch
    import transformers

    hf_model = transformers.AutoModelForCausalLM.from_pretrained(base, attn_implementation="eager")
    pm = peft.PeftModel.from_pretrained(hf_model, str(peft_dir)).eval()
    with torch.no_grad():
        return pm(torch.from_numpy(IDS).long()).logits.numpy()


def test_export_peft_of_an_adalora_run_loads_in_peft(base, ref_run, tmp_path, hf):
    hf.require("peft")
    from jlora.cli import main

    cfg, out, s = ref_run
    tree, _, _ = from_checkpoint(cfg, out / "checkpoints")
    want = _jlora_logits(base, tree)
    peft_dir = tmp_path / "peft"
    config = tmp_path / "ada.yaml"
    config.write_text(json.dumps(raw_config(base, out)))  # JSON is YAML
    rc = main(["export-peft", str(config), "--checkpoint", str(out / "checkpoints"),
               "--out", str(peft_dir)])  # fmt: skip
    assert rc == 0
    saved = json.loads((peft_dir / "adapter_config.json").read_text())
    assert saved["peft_type"] == "ADALORA" and saved["init_r"] == 4
    kept = {k.removesuffix(".lora_E"): sum(v) for k, v in saved["rank_pattern"].items()}
    assert kept == {jlora.peft.torch_module_name(k.removesuffix("/kernel")): v
                    for k, v in s["adalora"]["ranks"].items()}  # fmt: skip
    for d in (peft_dir, out / "peft"):  # the CLI's export and the run's own
        diff = float(np.max(np.abs(_peft_logits(base, d) - want)))
        print(f"{d.name}: max |PEFT logits - jlora logits| {diff:.2e}")
        assert diff <= 1e-5


def test_merge_of_an_adalora_run_is_w_plus_the_svd_update(base, ref_run, tmp_path):
    import safetensors.numpy

    from jlora.cli import main

    cfg, out, _ = ref_run
    tree, _, _ = from_checkpoint(cfg, out / "checkpoints")
    config = tmp_path / "ada.yaml"
    config.write_text(json.dumps(raw_config(base, out)))
    rc = main(["merge", str(config), "--checkpoint", str(out / "checkpoints"),
               "--out", str(tmp_path / "m"), "--format", "flax"])  # fmt: skip
    assert rc == 0
    got = safetensors.numpy.load_file(tmp_path / "m" / "model.safetensors")
    for path, n in alloc.adalora_targets(tree).items():
        q, e, p, w = (np.asarray(x, np.float64) for x in (n.q, n.e, n.p, n.w))
        by_hand = w + 8 / (4 + 1e-5) * (q * e) @ p  # W + α/(init_r + 1e-5)·Q·diag(Λ)·P
        np.testing.assert_allclose(got[path], by_hand, rtol=1e-5, atol=1e-6, err_msg=path)


def test_summary_without_adalora_has_no_adalora_entry(base, tmp_path):
    """A plain LoRA section builds a plain optax state (no allocator)."""
    raw = raw_config(base, tmp_path)
    raw["lora"] = {"rank": 2, "targets": TARGETS}
    cfg = C.from_dict(raw)
    _, state = opt_template(cfg)
    assert not isinstance(state, AdaLoraTrainState)
