"""The 7-8B knobs from a run config: ``model.attention / remat / quantize / double_quant /
loss_chunk``, ``lora.variant / use_dora / init``, ``optim.name`` + ``optim.kwargs``, the storage
dtypes in the summary; and a QLoRA run of ``configs/llama-qlora-tiny.yaml`` on a tiny Hugging
Face Llama (slow): exact resume, ``export-peft`` loaded by the real PEFT, ``merge`` loaded by
``from_pretrained``, generation with the checkpoint's tree, the chunked loss of the objective.

References: the plain (full-logits) loss of the same objective for the chunked one, optax for
the optimizers, transformers + peft for the export.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jlora
from jlora.interop.checkpoint import AdapterCheckpointer
from jlora.interop.models import from_pretrained, to_hf_state_dict
from jlora.train import load_config, train
from jlora.train.config import ConfigError
from jlora.train.engine.resume import OUTPUTS
from jlora.train.engine.setup import base_tree
from jlora.train.engine.steps import make_optimizer, make_schedule
from jlora.train.objectives import CausalLM
from jlora.variants.quant import NF4Weight

ROOT = Path(__file__).resolve().parents[1]
QLORA = ROOT / "configs" / "llama-qlora-tiny.yaml"
TINY = ROOT / "configs" / "llama-tiny.yaml"


# ---------------------------------------------------------------------------- config keys
@pytest.mark.parametrize(
    ("override", "match"),
    [
        ("model.attention=flash", r"model.attention must be one of auto, xla, chunked"),
        ("model.remat=sometimes", r"model.remat must be one of none, full, nothing_saveable"),
        ("model.double_quant=true", r"model.double_quant needs model.quantize: nf4, got None"),
        ("model.loss_chunk=0", r"model.loss_chunk must be > 0, got 0"),
        ("model.attention_block_size=0", r"model.attention_block_size must be > 0"),
        ("optim.name=adamz", r"optim.name 'adamz' is not an optax optimizer; valid names: "),
        ('optim.kwargs={"beta1":0.9}', r"optim.kwargs.beta1 is not an argument of optax.adamw"),
        ('optim.kwargs={"b1":0.8}', r"optim.kwargs.b1: set optim.b1 instead"),
        ('optim.kwargs={"weight_decay":0.1}', r"optim.kwargs.weight_decay: set optim.weight_decay"),
        ("optim.b1=0.8 optim.name=lion", r"optim.b1 is read by optim.name adam / adamw only"),
        ("lora.use_dora=true lora.variant=lora_fa", r"lora.use_dora: true and lora.variant"),
    ],
)
def test_bad_keys_name_the_key(override, match):
    with pytest.raises(ConfigError, match=match):
        load_config(TINY, override.split())


def test_gradient_checkpointing_conflicts_with_another_remat():
    with pytest.raises(ConfigError, match=r"conflicts with model.remat: dots_saveable"):
        load_config(TINY, ["model.gradient_checkpointing=true", "model.remat=dots_saveable"])


def test_qlora_config_builds_the_quantized_tree_and_the_model_options():
    objective, _, tree = base_tree(load_config(QLORA), shapes_only=True)
    model = objective.model
    assert (model.config.attention, model.config.attention_block_size) == ("chunked", 8)
    assert model.remat == "full" and objective.loss_chunk == 64
    nodes = [v for v in jax.tree.leaves(tree, is_leaf=lambda v: isinstance(v, jlora.LoraWeight))]
    lora = [v for v in nodes if isinstance(v, jlora.LoraWeight)]
    assert len(lora) == 14 and all(isinstance(v.w, NF4Weight) for v in lora)
    assert all(v.w.absmax_scale is not None for v in lora)  # double quantization
    assert {v.a.dtype for v in lora} == {jnp.dtype("float32")}


@pytest.mark.parametrize(
    ("overrides", "node", "init"),
    [
        (["lora.use_dora=true"], "DoraWeight", "kaiming"),
        (["lora.variant=dora", "lora.init=pissa"], "DoraWeight", "pissa"),
        (["lora.init=olora"], "LoraWeight", "olora"),
        (["lora.variant=lora_fa"], "LoraFAWeight", "kaiming"),
    ],
)
def test_variants_and_inits_from_the_config(overrides, node, init):
    cfg = load_config(TINY, overrides)
    assert cfg.lora.init == init
    _, _, tree = base_tree(cfg, shapes_only=True)
    kernel = tree["model"]["layers_0"]["self_attn"]["q_proj"]["kernel"]
    assert type(kernel).__name__ == node


@pytest.mark.parametrize(
    ("name", "kwargs"), [("adafactor", {"factored": False}), ("lion", {"b1": 0.95})]
)
def test_any_optax_optimizer_by_name(name, kwargs):
    import optax

    cfg = load_config(
        TINY, [f"optim.name={name}", f"optim.kwargs={json.dumps(kwargs, separators=(',', ':'))}"]
    )
    adapters = {"a": jnp.ones((4, 2)), "b": jnp.zeros((2, 4))}
    tx = make_optimizer(cfg.optim, make_schedule(cfg.optim, 10), adapters)
    grads = {"a": jnp.full((4, 2), 0.5), "b": jnp.full((2, 4), -0.25)}
    got, _ = tx.update(grads, tx.init(adapters), adapters)
    schedule = make_schedule(cfg.optim, 10)
    extra = {"weight_decay": 0.0} if name == "lion" else {}  # optim.weight_decay (0) passed on
    ref = optax.chain(
        optax.clip_by_global_norm(cfg.optim.clip_norm),
        getattr(optax, name)(schedule, **kwargs, **extra),
    )
    want, _ = ref.update(grads, ref.init(adapters), adapters)
    chex.assert_trees_all_close(got, want, atol=1e-7)


def test_loss_chunk_is_refused_outside_causal_lm():
    with pytest.raises(
        ConfigError, match=r"model.loss_chunk is read by the causal_lm objective only"
    ):
        load_config(ROOT / "configs" / "minilm-lora.yaml", ["model.loss_chunk=64"])


# ---------------------------------------------------------------------------- a QLoRA run
STEPS = 4
RUN = [
    f"train.max_steps={STEPS}",
    "train.eval_every=4",
    "train.log_every=2",
    "checkpoint.every_steps=2",
    "checkpoint.max_to_keep=5",
    "data.synthetic.num_train=64",
    "data.synthetic.num_eval=16",
    "data.test_split=null",
    "output.progress=false",
]


def overrides(hf_base, out) -> list[str]:
    return [*RUN, "model.random=null", f"model.path={hf_base}", f"output.dir={out}"]


@pytest.fixture(scope="module")
def ref_run(hf_base, tmp_path_factory):
    out = tmp_path_factory.mktemp("qlora") / "run"
    cfg = load_config(QLORA, overrides(hf_base, out))
    summary = train(cfg, echo=lambda m: None)
    return cfg, out, summary


def _restore(cfg, out, step=None):
    _, _, fresh = base_tree(cfg)
    with AdapterCheckpointer(out / "checkpoints") as ckpt:
        tree, _, got = ckpt.restore(fresh, step=step)
    return tree, got


@pytest.mark.slow
def test_qlora_run_trains_and_states_its_dtypes(ref_run):
    _, _, summary = ref_run
    assert summary["after"]["validation"]["loss"] < summary["before"]["validation"]["loss"]
    dtypes = summary["storage_dtypes"]
    assert set(dtypes["frozen"]) >= {"uint8", "bfloat16"}  # NF4 codes, embeddings / norms
    assert set(dtypes["adapters"]) == {"float32"}
    assert max(dtypes["optimizer_state"], key=dtypes["optimizer_state"].get) == "float32"


@pytest.mark.slow
def test_qlora_resume_continues_exactly(hf_base, ref_run, tmp_path):
    """The run with its last checkpoint and outputs removed resumes from step 2 to the same
    adapters, bit for bit."""
    cfg_ref, ref_out, _ = ref_run
    out = tmp_path / "run"
    shutil.copytree(ref_out, out)
    shutil.rmtree(out / "checkpoints" / str(STEPS))
    for name in OUTPUTS:
        if name != "metrics.jsonl":
            (out / name).unlink(missing_ok=True)
    cfg = load_config(QLORA, overrides(hf_base, out))
    lines = []
    train(cfg, resume=True, echo=lines.append)
    assert any("resumed from step 2" in x for x in lines)
    (got, s1), (want, s2) = _restore(cfg, out), _restore(cfg_ref, ref_out)
    assert s1 == s2 == STEPS
    got, want = jax.tree.leaves(jlora.split(got)[1]), jax.tree.leaves(jlora.split(want)[1])
    for a, b in zip(got, want, strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


@pytest.mark.slow
def test_qlora_export_peft_loads_in_peft_and_merge_loads(hf_base, ref_run, tmp_path, hf):
    """``jlora export-peft`` of the QLoRA checkpoint, loaded by the real PEFT onto the base
    dequantized from NF4, gives jlora's logits of the quantized tree; ``jlora merge`` writes the
    model of `jlora.merge` (W dequantized to bfloat16 plus ΔW)."""
    torch, peft = hf.require("torch"), hf.require("peft")
    transformers = hf.require("transformers")
    from jlora.cli import main

    cfg, out, _ = ref_run
    tree, _ = _restore(cfg, out)
    ids = np.random.default_rng(0).integers(0, 128, (2, 9))
    model = base_tree(cfg, shapes_only=True)[0].model
    want = np.asarray(jlora.lora(model.apply)({"params": tree}, ids))
    config = tmp_path / "qlora.yaml"
    shutil.copy(QLORA, config)
    over = ["--set", *overrides(hf_base, out)]
    peft_dir = tmp_path / "peft"
    assert main(["export-peft", str(config), "--out", str(peft_dir), *over]) == 0
    # the base PEFT loads onto: each W dequantized from its NF4 codes in float32, as the
    # forward of the quantized tree computes it (float32 compute); the rest as stored
    base = jax.tree.map(
        lambda v: v.w.dequantize(jnp.float32) if isinstance(v, jlora.LoraWeight) else v,
        tree,
        is_leaf=lambda v: isinstance(v, jlora.LoraWeight),
    )
    deq = tmp_path / "dequantized"
    deq.mkdir()
    shutil.copy(hf_base / "config.json", deq / "config.json")
    import safetensors.numpy

    sd = {k: np.asarray(v, np.float32) for k, v in to_hf_state_dict(base).items()}
    safetensors.numpy.save_file(sd, str(deq / "model.safetensors"))
    hf_model = transformers.AutoModelForCausalLM.from_pretrained(deq, dtype=torch.float32)
    pm = peft.PeftModel.from_pretrained(hf_model, str(peft_dir)).eval()
    with torch.no_grad():
        got = pm(input_ids=torch.from_numpy(ids)).logits.numpy()
    print(f"PEFT on the dequantized base vs jlora's QLoRA tree: {np.abs(got - want).max():.2e}")
    np.testing.assert_allclose(got, want, atol=2e-4, rtol=0)
    merged = tmp_path / "merged"
    assert main(["merge", str(config), "--out", str(merged), *over]) == 0
    m_model, m_params = from_pretrained(merged)
    got = np.asarray(m_model.apply(m_params, ids))
    # merge writes W dequantized to the base's dtype (bfloat16) + ΔW: bf16 rounding apart
    print(f"merged model vs jlora's QLoRA tree: {np.abs(got - want).max():.2e}")
    np.testing.assert_allclose(got, want, atol=5e-2, rtol=0)
    np.testing.assert_allclose(got, np.asarray(model.apply({"params": jlora.merge(tree)}, ids)),
                               atol=1e-5, rtol=0)  # fmt: skip


@pytest.mark.slow
def test_qlora_objective_chunked_terms_equal_the_plain_ones(ref_run):
    """The run's objective with the LM head over token chunks (16 of the 46 scored tokens at a
    time, so three chunks, the last one padded) scores a batch as the full-logits loss does,
    on the trained QLoRA tree."""
    cfg, out, _ = ref_run
    tree, _ = _restore(cfg, out)
    objective = base_tree(cfg, shapes_only=True)[0]
    assert objective.loss_chunk == 64
    objective = CausalLM(objective.model, loss_chunk=16)
    rng = np.random.default_rng(1)
    batch = {
        "input_ids": jnp.asarray(rng.integers(0, 128, (2, 24)), jnp.int32),
        "attention_mask": jnp.asarray([[1] * 24, [1] * 17 + [0] * 7]),
    }
    chunked = jax.jit(objective.terms)(tree, batch)
    plain = jax.jit(CausalLM(objective.model).terms)(tree, batch)
    chex.assert_trees_all_close(chunked, plain, atol=0, rtol=1e-6)


@pytest.mark.slow
def test_generate_with_the_quantized_checkpoint(ref_run):
    """`jlora.models.generate` (what ``jlora generate`` runs) with the checkpoint's NF4 tree
    and chunked attention: the greedy tokens of one forward of the whole sequence, no cache."""
    from jlora.interop.models import generate

    cfg, out, _ = ref_run
    tree, _ = _restore(cfg, out)
    assert any(isinstance(v, NF4Weight) for v in jax.tree.leaves(
        tree, is_leaf=lambda v: isinstance(v, NF4Weight)))  # fmt: skip
    model = base_tree(cfg, shapes_only=True)[0].model
    prompts = np.random.default_rng(2).integers(3, 128, (2, 5))
    got = np.asarray(
        generate(model, tree, prompts, max_new_tokens=4, eos_token_id=[], pad_token_id=0)
    )
    np.testing.assert_array_equal(got[:, :5], prompts)
    # one forward of the whole generated sequence: each new token is the argmax of the logits
    # at the position before it (greedy decoding, no cache)
    logits = np.asarray(jlora.lora(model.apply)({"params": tree}, got))
    np.testing.assert_array_equal(got[:, 5:], logits[:, 4:-1].argmax(-1))
