"""LoftQ (``lora.init: loftq``) and VeRA (``lora.variant: vera``) in `jlora train`: the ``lora``
section parses into the config class the init / variant registered (`LoftQConfig`,
`VeraConfig`), whose fields are then ``lora`` keys; each error names its key; LoftQ asks for
``model.quantize: nf4``, whose base it keeps.

Slow: a 3-step run of each on a tiny Llama saved by transformers, from
``configs/llama-tiny.yaml`` and ``--set`` overrides: the adapters it starts from equal
`jlora.init` called by hand with the same config, the summary counts the right parameters and
bytes, ``--resume`` from step 2 ends bit for bit where the uninterrupted run did, ``jlora
export-peft`` loads in the real PEFT (VeRA's ``VERA`` format; LoftQ's LoRA adapters onto the
``base/`` it writes) with jlora's logits, and ``jlora merge`` is ``W + ΔW`` in float64 numpy.
"""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jlora
from jlora.core.node import is_node
from jlora.train import load_config, train
from jlora.train import reference as ref
from jlora.train.config import ConfigError, from_dict, to_dict
from jlora.train.engine.model import quantize_base
from jlora.train.engine.resume import OUTPUTS
from jlora.train.engine.setup import base_tree
from jlora.train.io.export import from_checkpoint, from_peft
from jlora.train.methods import LoftQ, Method, method_for
from jlora.train.sections import ModelConfig
from jlora.variants.loftq import LoftQConfig
from jlora.variants.vera import VeraConfig, VeraWeight

ROOT = Path(__file__).resolve().parents[1]
TINY = ROOT / "configs" / "llama-tiny.yaml"
MAIN = ROOT / "configs" / "minilm-lora.yaml"
LOFTQ = ["lora.init=loftq", "model.quantize=nf4", "lora.loftq_iter=2"]
VERA = ["lora.variant=vera", "lora.rank=16", "lora.d_initial=0.5", "lora.projection_prng_key=7"]


# --- the lora section (default tests: configs only) -------------------------------------------


def test_the_section_parses_into_the_registered_config_class():
    cfg = load_config(MAIN, [*LOFTQ, "lora.rank=8", "lora.alpha=8", "lora.block_size=32"])
    assert type(cfg.lora) is LoftQConfig and type(method_for(cfg.lora)) is LoftQ
    assert (cfg.lora.init, cfg.lora.loftq_iter, cfg.lora.loftq_bits, cfg.lora.block_size) == (
        "loftq", 2, 4, 32)  # fmt: skip
    assert cfg.lora.targets == ("query", "key", "value", "attention/output/dense")  # the file's
    vera = load_config(MAIN, [*VERA, "lora.save_projection=false"]).lora
    assert type(vera) is VeraConfig and type(method_for(vera)) is Method
    assert (vera.rank, vera.d_initial, vera.projection_prng_key, vera.save_projection) == (
        16, 0.5, 7, False)  # fmt: skip
    assert type(load_config(MAIN, ["lora.method=vera"]).lora) is VeraConfig  # method = variant
    for cfg in (load_config(MAIN, LOFTQ), load_config(MAIN, VERA)):
        assert from_dict(to_dict(cfg)) == cfg  # config.yaml (and a checkpoint's) reads back


@pytest.mark.parametrize(
    ("overrides", "error", "message"),
    [
        (["lora.loftq_iter=2"], ConfigError,
         r"^lora.loftq_iter is a field of lora.init: loftq, not of this section's variant 'lora' "
         r"with init 'kaiming': set lora.init: loftq \(or remove lora.loftq_iter\)$"),
        ([*VERA, "lora.block_size=32"], ConfigError,
         r"^lora.block_size is a field of lora.init: loftq, not of this section's variant 'vera'"),
        ([*LOFTQ, "lora.d_initial=0.2"], ConfigError,
         r"^lora.d_initial is a field of lora.variant: vera, not of this section's variant "
         r"'lora' with init 'loftq': set lora.variant: vera \(or remove lora.d_initial\)$"),
        (["lora.save_projection=false"], ConfigError,
         r"^lora.save_projection is a field of lora.variant: vera"),
        (["lora.method=adalora", "lora.init_r=4", "lora.projection_prng_key=1"], ConfigError,
         r"^lora.projection_prng_key is a field of lora.variant: vera, not of this section's "
         r"variant 'adalora'"),
        ([*LOFTQ, "lora.loftq_iter=0"], ValueError,
         r"^lora: `loftq_iter` must be a positive integer, got 0\.$"),
        ([*LOFTQ, "lora.loftq_iter=two"], ValueError,
         r"^lora: `loftq_iter` must be a positive integer, got 'two'\.$"),
        ([*LOFTQ, "lora.loftq_bits=8"], ValueError, r"^lora: `loftq_bits` must be 4 \(NF4\), got 8"),
        ([*LOFTQ, "lora.block_size=7"], ValueError,
         r"^lora: `block_size` must be an even integer >= 2, got 7\.$"),
        ([*VERA, "lora.d_initial=big"], ValueError,
         r"^lora: `d_initial` must be a finite number, got 'big'\.$"),
        ([*VERA, "lora.projection_prng_key=-1"], ValueError,
         r"^lora: `projection_prng_key` must be an integer >= 0, got -1\.$"),
        ([*VERA, "lora.save_projection=1"], ValueError,
         r"^lora: `save_projection` must be a bool, got 1\.$"),
        ([*VERA, 'lora.rank_pattern={"query": 4}'], ValueError,
         r"^lora: VeRA has one rank for every target"),
        ([*VERA, "lora.use_rslora=true"], ValueError, r"^lora: VeRA has no α"),
        ([*VERA, *LOFTQ], ValueError,
         r"^lora: variant='vera' takes a VeraConfig and init='loftq' a LoftQConfig: no config "
         r"class combines them\.$"),
        (["lora.init=loftq"], ConfigError,
         r"^lora.init: loftq needs model.quantize: nf4 \(got None\): LoftQ quantizes the "
         r"targeted W to NF4 itself and fits the adapters to that quantized base"),
        (["lora.init=loftq", "model.quantize=int8"], ConfigError,
         r"^lora.init: loftq needs model.quantize: nf4 \(got 'int8'\)"),
        ([*LOFTQ, "model.double_quant=true"], ConfigError,
         r"^lora.init: loftq takes no model.double_quant: "),
        (["lora.loftq_itr=2"], ConfigError,
         r"^unknown key 'lora.loftq_itr' \(did you mean 'loftq_iter'\?\)"),
    ],
)  # fmt: skip
def test_errors_name_the_key(overrides, error, message):
    with pytest.raises(error, match=message):
        load_config(MAIN, overrides)


def test_the_config_reference_documents_the_new_keys():
    keys = {k.path: k for k in ref.run_keys()}
    for key, where in (
        ("lora.loftq_iter", "lora.init: loftq"),
        ("lora.loftq_bits", "lora.init: loftq"),
        ("lora.block_size", "lora.init: loftq"),
        ("lora.d_initial", "lora.variant: vera"),
        ("lora.projection_prng_key", "lora.variant: vera"),
        ("lora.save_projection", "lora.variant: vera"),
    ):
        assert keys[key].where == where and keys[key].doc, key
    assert keys["lora.loftq_iter"].default == "1" and keys["lora.d_initial"].default == "0.1"


def test_quantize_base_keeps_what_the_init_quantized():
    """LoftQ's NF4 residual stays as `jlora.init` made it (not quantized again); a plain W
    beside it is quantized; an init quantization of another kind than model.quantize is
    refused."""
    rng = np.random.default_rng(0)
    params = {n: jnp.asarray(rng.normal(size=(64, 32)), jnp.float32) for n in ("q", "v", "o")}
    tree = jlora.init(params, LoftQConfig(rank=2, targets="^[qv]$"), key=jax.random.key(0))
    tree["o"] = jlora.init({"o": params["o"]}, jlora.LoraConfig(rank=2, targets="o"),
                           key=jax.random.key(1))["o"]  # fmt: skip
    got = quantize_base(tree, ModelConfig(random={"model_type": "llama"}, quantize="nf4"))
    for n in ("q", "v"):
        assert got[n].w is tree[n].w
    assert type(got["o"].w).__name__ == "NF4Weight"
    np.testing.assert_array_equal(  # the plain W quantized as jlora.quant.quantize does
        np.asarray(got["o"].w.dequantize()),
        np.asarray(jlora.quant.quantize({"o": tree["o"]})["o"].w.dequantize()),
    )
    with pytest.raises(ConfigError, match=(
        r"^model.quantize: int8: the LoRA init already quantized q as NF4Weight$")):  # fmt: skip
        quantize_base(tree, ModelConfig(random={"model_type": "llama"}, quantize="int8"))


def test_import_peft_of_an_export_with_its_base_names_the_fix(tmp_path, capsys):
    """A LoftQ export holds its base (``base/``): importing its adapters into a checkpoint of a
    run on another model.path is refused before anything is read or written."""
    from jlora.cli import main

    peft_dir = tmp_path / "peft"
    (peft_dir / "base").mkdir(parents=True)
    (peft_dir / "base" / "config.json").write_text("{}")
    out = tmp_path / "imported"
    rc = main(["import-peft", str(MAIN), "--peft", str(peft_dir), "--out", str(out), "--set",
               *LOFTQ])  # fmt: skip
    assert rc == 2 and not out.exists()
    assert re.fullmatch(
        rf"jlora: error: {peft_dir} holds the base its adapters apply to \({peft_dir}/base: they "
        r"were fitted to it, e.g. LoftQ's NF4 residual\); a checkpoint holds the adapters only "
        rf"and restores them onto model.path: set model.path: {peft_dir}/base \(jlora merge "
        r"--peft reads the base itself\)\n",
        capsys.readouterr().err,
    )


# --- a run of each (slow: a tiny Llama saved by transformers) ---------------------------------

STEPS = 3
RUN = [
    f"train.max_steps={STEPS}",
    f"train.eval_every={STEPS}",
    "train.log_every=1",
    "train.eval_before=false",
    "checkpoint.every_steps=1",
    "checkpoint.max_to_keep=5",
    "data.synthetic.num_train=64",
    "data.synthetic.num_eval=16",
    "data.test_split=null",
    "output.progress=false",
    "lora.trainable=[]",
    "lora.targets=[q_proj,v_proj]",
]
METHODS = {  # overrides, the config by hand, trainable params (q: 64 -> 64, v: 64 -> 32; 2 layers)
    "loftq": (
        [*LOFTQ, "lora.rank=4", "lora.alpha=4"],
        LoftQConfig(rank=4, alpha=4, targets=["q_proj", "v_proj"], dropout=0.05, loftq_iter=2),
        2 * (4 * (64 + 64) + 4 * (64 + 32)),
    ),
    "vera": (
        VERA,
        VeraConfig(
            rank=16,
            targets=["q_proj", "v_proj"],
            dropout=0.05,
            d_initial=0.5,
            projection_prng_key=7,
        ),
        2 * ((16 + 64) + (16 + 32)),  # λ_d (r) and λ_b (out) per target
    ),
}
IDS = np.random.default_rng(0).integers(0, 128, (2, 9))


def _overrides(method, hf_base, out) -> list[str]:
    return [*RUN, *METHODS[method][0], "model.random=null", f"model.path={hf_base}",
            f"output.dir={out}"]  # fmt: skip


def _adapters(tree):
    return jax.tree.leaves(jlora.split(tree)[1])


def _numpy_merge(x) -> np.ndarray:
    """W + ΔW of one target from its children, float64 (LoftQ: W is the NF4 residual)."""
    if isinstance(x, VeraWeight):
        w = np.float64(x.w)
        n_in, n_out = w.shape
        a = np.float64(x.vera_a.value)[:n_in] * np.float64(x.lambda_d)
        return w + a @ (np.float64(x.vera_b.value)[:, :n_out] * np.float64(x.lambda_b))
    w = np.float64(x.w.dequantize(jnp.float32))
    return w + x.scale * np.float64(x.a) @ np.float64(x.b)


@pytest.mark.slow
@pytest.mark.parametrize("method", list(METHODS))
def test_run_resume_export_and_merge(method, hf_base, tmp_path, hf):
    torch, peft = hf.require("torch"), hf.require("peft")
    transformers = hf.require("transformers")
    import safetensors.numpy

    from jlora.cli import main

    _, by_hand, trainable = METHODS[method]
    out = tmp_path / "run"
    cfg = load_config(TINY, _overrides(method, hf_base, out))
    assert cfg.lora == by_hand
    # the adapters (and LoftQ's frozen NF4 residual) a run starts from: jlora.init by hand
    _, params, start = base_tree(cfg)
    chex.assert_trees_all_equal(jlora.split(start), jlora.split(
        jlora.init(params, by_hand, key=jax.random.key(0))))  # fmt: skip
    lines: list[str] = []
    summary = train(cfg, echo=lines.append)
    assert summary["steps"] == STEPS and summary["trainable_params"] == trainable
    frozen = summary["storage_dtypes"]["frozen"]
    if method == "vera":  # the base in float32 and the projections (64, 16), (16, 64) once
        assert frozen == {"float32": 4 * summary["base_params"] + 4 * 2 * 64 * 16}
        assert summary["adapter_params"] == trainable + 2 * 64 * 16
    else:  # q and v as NF4 codes (half a byte per weight)
        assert frozen["uint8"] == 2 * (64 * 64 + 64 * 32) // 2
    tree, lcfg, _ = from_checkpoint(cfg, out / "checkpoints", step=STEPS)
    assert lcfg == by_hand
    model = base_tree(cfg, shapes_only=True)[0].model
    want = np.asarray(jax.jit(jlora.lora(model.apply))({"params": tree}, IDS))

    # --resume from step 2: the same adapters at step 3, bit for bit
    resumed = tmp_path / "resumed"
    shutil.copytree(out, resumed)
    shutil.rmtree(resumed / "checkpoints" / str(STEPS))
    for name in OUTPUTS:
        if name != "metrics.jsonl":
            (resumed / name).unlink(missing_ok=True)
    rcfg = load_config(TINY, _overrides(method, hf_base, resumed))
    train(rcfg, resume=True, echo=lines.append)
    assert any("resumed from step 2" in x for x in lines)
    for a, b in zip(_adapters(from_checkpoint(rcfg, resumed / "checkpoints")[0]), _adapters(tree),
                    strict=True):  # fmt: skip
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))

    # export-peft, loaded by PEFT: VeRA onto the pretrained base, LoftQ onto base/
    config = tmp_path / "run.yaml"
    shutil.copy(TINY, config)
    cli = ["--set", *_overrides(method, hf_base, out)]
    peft_dir = tmp_path / "peft"
    assert main(["export-peft", str(config), "--out", str(peft_dir), *cli]) == 0
    saved = json.loads((peft_dir / "adapter_config.json").read_text())
    if method == "vera":
        assert saved["peft_type"] == "VERA" and saved["projection_prng_key"] == 7
        base = hf_base
    else:
        assert saved["peft_type"] == "LORA" and saved["init_lora_weights"] is True
        base = Path(saved["base_model_name_or_path"])
        assert base == (peft_dir / "base").resolve()
    if method == "vera":
        hf_model = transformers.AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
        pm = peft.PeftModel.from_pretrained(hf_model, str(peft_dir)).eval()
    else:  # the base named by the adapter config
        pm = peft.AutoPeftModelForCausalLM.from_pretrained(peft_dir, dtype=torch.float32).eval()
    with torch.no_grad():
        got = pm(input_ids=torch.from_numpy(IDS)).logits.numpy()
    print(f"{method}: max |PEFT logits - jlora logits| {np.abs(got - want).max():.2e}")
    np.testing.assert_allclose(got, want, atol=2e-5, rtol=0)
    if method == "loftq":  # the pretrained W under the adapters: the correction counted twice
        pretrained = transformers.AutoModelForCausalLM.from_pretrained(hf_base, dtype=torch.float32)
        wrong = peft.PeftModel.from_pretrained(pretrained, str(peft_dir)).eval()
        with torch.no_grad():
            off = np.abs(wrong(input_ids=torch.from_numpy(IDS)).logits.numpy() - want).max()
        print(f"loftq: the adapters on the pretrained base instead: {off:.2e}")
        assert off > 100 * np.abs(got - want).max()

    # the export read back (jlora merge --peft): the adapters and the frozen base of the
    # checkpoint (LoftQ's residual from base/, quantized again to the same NF4 codes)
    back = from_peft(cfg, peft_dir)[0]
    chex.assert_trees_all_close(jlora.split(back)[1], jlora.split(tree)[1], atol=1e-7)
    chex.assert_trees_all_equal(jax.tree.leaves(jlora.split(back)[0]),
                                jax.tree.leaves(jlora.split(tree)[0]))  # fmt: skip

    if method == "loftq":  # import-peft onto the export's base: the same tree from a checkpoint
        ckpt = tmp_path / "imported"
        at_base = [*cli, f"model.path={peft_dir / 'base'}"]
        assert main(["import-peft", str(config), "--peft", str(peft_dir), "--out", str(ckpt),
                     *at_base]) == 0  # fmt: skip
        back = from_checkpoint(load_config(TINY, at_base[1:]), ckpt)[0]
        chex.assert_trees_all_close(jlora.split(back)[1], jlora.split(tree)[1], atol=1e-7)
        chex.assert_trees_all_equal(jax.tree.leaves(jlora.split(back)[0]),
                                    jax.tree.leaves(jlora.split(tree)[0]))  # fmt: skip

    # merge: W + ΔW per target
    merged = tmp_path / "merged"
    assert main(["merge", str(config), "--out", str(merged), "--format", "flax", *cli]) == 0
    flat = safetensors.numpy.load_file(merged / "model.safetensors")
    n = 0
    for p, x in jax.tree_util.tree_flatten_with_path(tree, is_leaf=is_node)[0]:
        if isinstance(x, jlora.LoraWeight | VeraWeight):
            np.testing.assert_allclose(flat[jlora.path_str(p)], _numpy_merge(x), rtol=1e-5,
                                       atol=1e-6)  # fmt: skip
            n += 1
    assert n == 4
