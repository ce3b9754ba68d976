"""SFT data for the causal-LM task: prompt/completion and chat rows, completion-only loss,
packing with segment ids (jlora.train.data.sft)."""

from __future__ import annotations

import json
import re
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from tokenizers import Tokenizer

from jlora.interop.models.llama import LlamaConfig, LlamaForCausalLM
from jlora.train.data import Split
from jlora.train.data.sft import (
    Example,
    encode_examples,
    load_sft_jsonl,
    load_sft_splits,
    pack,
    render_chat,
)
from jlora.train.objectives import CausalLM

TOKENIZER = "data/sft-tiny/tokenizer.json"
CHATML = (
    "{% for m in messages %}{{ '<|' + m['role'] + '|> ' + m['content'] + ' </s> ' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|assistant|>' }}{% endif %}"
)


def _tok() -> Tokenizer:
    return Tokenizer.from_file(TOKENIZER)


def _model(vocab: int = 32) -> tuple[LlamaForCausalLM, dict]:
    cfg = LlamaConfig(
        vocab_size=vocab,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
    )
    model = LlamaForCausalLM(cfg)
    return model, model.init(jax.random.key(0), jnp.zeros((1, 4), jnp.int32))["params"]


def _write(path, rows) -> None:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))


def _np_loss(logits: np.ndarray, ids: np.ndarray, mask: np.ndarray) -> float:
    """Mean next-token cross-entropy (float64) over targets t with mask[t] = 1."""
    x = logits[:, :-1].astype(np.float64)
    logp = x - x.max(-1, keepdims=True)
    logp = logp - np.log(np.exp(logp).sum(-1, keepdims=True))
    nll = -np.take_along_axis(logp, ids[:, 1:, None], -1)[..., 0]
    w = mask[:, 1:].astype(np.float64)
    return float((nll * w).sum() / w.sum())


def test_prompt_completion_loss_is_on_completion_tokens_only(tmp_path):
    _write(
        tmp_path / "d.jsonl",
        [
            {"prompt": "sort : 3 1 2 =>", "completion": " 1 2 3"},
            {"prompt": "reverse : red cat =>", "completion": " cat red"},
        ],
    )
    examples = load_sft_jsonl(tmp_path / "d.jsonl", template_dir=tmp_path)
    split, lengths = encode_examples(_tok(), examples, 16, eos_id=1)
    vocab = json.loads(Path(TOKENIZER).read_text())["model"]["vocab"]
    for i, (p, c) in enumerate([("sort : 3 1 2 =>", "1 2 3"), ("reverse : red cat =>", "cat red")]):
        want = [vocab[w] for w in p.split()] + [vocab[w] for w in c.split()] + [1]
        n_prompt = len(p.split())
        assert lengths[i] == len(want)
        np.testing.assert_array_equal(split.input_ids[i, : len(want)], want)
        expect_mask = np.zeros(16, np.int32)
        expect_mask[n_prompt : len(want)] = 1  # completion tokens and EOS
        np.testing.assert_array_equal(split.loss_mask[i], expect_mask)
    model, params = _model()
    task = CausalLM(model)
    batch = {k: jnp.asarray(v) for k, v in split.take(np.arange(2)).items()}
    t = task.terms(params, batch)
    logits = np.asarray(
        model.apply({"params": params}, batch["input_ids"], batch["attention_mask"])
    )
    want = _np_loss(logits, split.input_ids, split.loss_mask)
    assert float(t["weight"]) == split.loss_mask[:, 1:].sum()
    np.testing.assert_allclose(float(t["loss"] / t["weight"]), want, rtol=1e-5)


def test_chat_template_renders_as_transformers_and_trains_assistant_turns(tmp_path):
    from transformers import PreTrainedTokenizerFast

    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"chat_template": CHATML}))
    msgs = [
        {"role": "system", "content": "be brief"},
        {"role": "user", "content": "sort : 3 1"},
        {"role": "assistant", "content": "1 3"},
        {"role": "user", "content": "reverse : red cat"},
        {"role": "assistant", "content": "cat red"},
    ]
    _write(tmp_path / "chat.jsonl", [{"messages": msgs}])
    hf = PreTrainedTokenizerFast(tokenizer_file=TOKENIZER)
    hf.chat_template = CHATML
    assert render_chat(CHATML, msgs) == hf.apply_chat_template(msgs, tokenize=False)
    head = hf.apply_chat_template(msgs[:1], tokenize=False, add_generation_prompt=True)
    assert render_chat(CHATML, msgs[:1], add_generation_prompt=True) == head
    (ex,) = load_sft_jsonl(tmp_path / "chat.jsonl", template_dir=tmp_path)
    assert "".join(t for t, _ in ex.chunks) == hf.apply_chat_template(msgs, tokenize=False)
    assert [t for t, trained in ex.chunks if trained] == [" 1 3 </s> ", " cat red </s> "]
    assert ex.prompt.endswith("reverse : red cat </s> <|assistant|>")


def test_chat_data_without_a_template_is_one_clear_error(tmp_path):
    _write(tmp_path / "c.jsonl", [{"messages": [{"role": "assistant", "content": "x"}]}])
    with pytest.raises(
        ValueError,
        match=r"c.jsonl:1: chat data needs a chat template, but .*"
        r"tokenizer_config.json has no 'chat_template'",
    ):
        load_sft_jsonl(tmp_path / "c.jsonl", template_dir=tmp_path)


@pytest.mark.parametrize(
    "row, message",
    [
        ({"prompt": "a"}, "a 'prompt' row needs a string 'completion'"),
        ({"messages": [{"role": "user"}]}, "expected {'prompt', 'completion'} strings or"),
        ({"messages": [{"role": "user", "content": "x"}]}, "'messages' has no assistant turn"),
    ],
)
def test_malformed_sft_rows_name_file_and_line(tmp_path, row, message):
    _write(tmp_path / "d.jsonl", [{"prompt": "a", "completion": "b"}, row])
    with pytest.raises(ValueError, match=r"d.jsonl:2: " + re.escape(message)):
        load_sft_jsonl(tmp_path / "d.jsonl", template_dir=tmp_path)


CHAT = {"messages": [{"role": "user", "content": "3 1"}, {"role": "assistant", "content": "1 3"}]}


@pytest.mark.parametrize(
    "template, message",
    [
        (  # a syntax error: the template's file and line (it was a raw jinja traceback)
            "{% for m in messages %}\n{{ m.content }",
            r"tokenizer_config.json: the chat template has a syntax error at its line 2: "
            r"unexpected '}'",
        ),
        (  # the template raises: the data file and line of the conversation too
            "{{ raise_exception('no system role') }}",
            r"c.jsonl:2: the chat template of .*tokenizer_config.json failed on this "
            r"conversation: TemplateError: no system role",
        ),
    ],
)
def test_a_broken_chat_template_names_its_file(tmp_path, template, message):
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"chat_template": template}))
    _write(tmp_path / "c.jsonl", [{"prompt": "a", "completion": "b"}, CHAT])
    with pytest.raises(ValueError, match=message):
        load_sft_jsonl(tmp_path / "c.jsonl", template_dir=tmp_path)


def _files(tmp_path, rows) -> dict:
    _write(tmp_path / "train.jsonl", rows)
    (tmp_path / "tokenizer.json").write_text(Path(TOKENIZER).read_text())
    return {"train": tmp_path / "train.jsonl"}


def test_sft_files_that_cannot_be_read_name_file_and_line(tmp_path):
    files = _files(tmp_path, [{"prompt": "sort : 3 1 =>", "completion": " 1 3"}])
    kw = dict(max_len=32, length=None, eos_id=1, pad_id=0)
    (tmp_path / "tokenizer_config.json").write_text('{"eos_token": "</s>",')
    with pytest.raises(ValueError, match=r"tokenizer_config.json: not valid JSON \("):
        load_sft_splits(files, _tok(), str(tmp_path / "tokenizer.json"), **kw)
    (tmp_path / "tokenizer_config.json").unlink()
    with open(files["train"], "ab") as f:
        f.write(b'{"prompt": "caf\xe9", "completion": " x"}\n')
    with pytest.raises(ValueError, match=r"train.jsonl:2: not UTF-8 text \(invalid continuation"):
        load_sft_splits(files, _tok(), str(tmp_path / "tokenizer.json"), **kw)


def test_examples_cut_before_their_completion_are_counted_or_refused(tmp_path):
    long = "sort : " + " ".join("3" * 12) + " =>"  # 15 prompt tokens
    rows = [{"prompt": "sort : 3 1 =>", "completion": " 1 3"}, {"prompt": long, "completion": " 3"}]
    files = _files(tmp_path, rows * 2)
    tok_path = str(tmp_path / "tokenizer.json")
    kw = dict(max_len=8, length=8, eos_id=1, pad_id=0)
    longest = len(_tok().encode(long).ids) + len(_tok().encode(" 3").ids) + 1  # + EOS
    with pytest.warns(UserWarning) as record:
        splits, _ = load_sft_splits(files, _tok(), tok_path, **kw)
    assert [str(w.message) for w in record] == [
        f"{files['train']}: 2 of 4 examples keep no trained token within 8 tokens "
        "(data.max_len) and train on nothing (lines 2, 4); raise data.max_len (the longest "
        f"example has {longest} tokens) or shorten the prompts"
    ]
    assert splits["train"].loss_mask.any(1).tolist() == [True, False, True, False]
    files = _files(tmp_path, rows[1:])  # every example: nothing to train on (was a 0/0 loss)
    with pytest.raises(ValueError, match=r"train.jsonl: none of the 1 examples keeps a trained "):
        load_sft_splits(files, _tok(), tok_path, **kw)


def _examples(n: int, seed: int = 0) -> Split:
    rng = np.random.default_rng(seed)
    lengths = rng.integers(3, 9, n)
    ids = np.zeros((n, 12), np.int32)
    mask, loss = np.zeros_like(ids), np.zeros_like(ids)
    for i, k in enumerate(lengths):
        ids[i, :k] = rng.integers(3, 32, k)
        mask[i, :k] = 1
        loss[i, k // 2 : k] = 1
    return Split(ids, mask, None, loss_mask=loss)


def test_packed_logits_and_loss_equal_unpacked():
    split = _examples(7)
    packed = pack(split)
    assert len(packed) < len(split)
    model, params = _model()
    fwd = jax.jit(lambda ids, m, seg: model.apply({"params": params}, ids, m, segment_ids=seg))
    plain = np.asarray(model.apply({"params": params}, split.input_ids, split.attention_mask))
    pl = np.asarray(fwd(packed.input_ids, packed.attention_mask, packed.segment_ids))
    # every example, found in its packed row by its segment, has its own logits
    seen = 0
    for r in range(len(packed)):
        at = 0
        for s in range(1, packed.segment_ids[r].max() + 1):
            n = int((packed.segment_ids[r] == s).sum())
            i = next(
                i
                for i in range(len(split))
                if split.attention_mask[i].sum() == n
                and (split.input_ids[i, :n] == packed.input_ids[r, at : at + n]).all()
            )
            np.testing.assert_allclose(pl[r, at : at + n], plain[i, :n], atol=2e-5)
            at += n
            seen += 1
    assert seen == len(split)
    task = CausalLM(model)
    tp = task.terms(
        params, {k: jnp.asarray(v) for k, v in packed.take(np.arange(len(packed))).items()}
    )
    tu = task.terms(
        params, {k: jnp.asarray(v) for k, v in split.take(np.arange(len(split))).items()}
    )
    want = _np_loss(plain, split.input_ids, split.loss_mask)
    assert float(tp["weight"]) == float(tu["weight"])
    np.testing.assert_allclose(float(tp["loss"] / tp["weight"]), want, rtol=1e-5)
    np.testing.assert_allclose(float(tu["loss"] / tu["weight"]), want, rtol=1e-5)


def test_example_prompt_and_completion():
    ex = Example((("a", False), ("b", True), ("c", False), ("d", True)))
    assert (ex.prompt, ex.completion) == ("abc", "d")


def test_config_reads_sft_data_and_packs_the_train_split():
    from jlora.train import load_config
    from jlora.train.engine.setup import prepare

    over = ["data.packing=true", "model.random.num_hidden_layers=1"]
    p = prepare(load_config("configs/llama-sft-tiny.yaml", overrides=over))
    train, ev = p.splits["train"], p.splits["eval"]
    assert train.segment_ids is not None and ev.segment_ids is None
    assert len(train) < 2000 and train.input_ids.shape[1] == 32
    assert train.attention_mask.sum() == sum(  # every example's tokens, each once
        len(_tok().encode(t).ids) + (t == ex.chunks[-1][0])
        for ex in p.examples["train"]
        for t, _ in ex.chunks
    )
    assert len(p.examples["eval"]) == len(ev) == 128


def test_score_counts_exact_matches_and_positional_tokens():
    from jlora.train.io.generate import score

    got = score([[5, 6, 7], [5], []], [[5, 6, 7], [5, 9], [4]])
    assert got == {"exact_match": 1 / 3, "token_accuracy": 4 / 6}


@pytest.mark.slow
def test_generation_metrics_equal_a_full_forward_greedy_reference(tmp_path):
    from jlora.train.io.generate import generation_metrics

    rows = [
        {"prompt": "sort : 3 1 2 =>", "completion": " 1 2 3"},
        {"prompt": "reverse : red cat dog =>", "completion": " dog cat red"},
        {"prompt": "add : 4 + 5 =>", "completion": " 9"},
    ]
    _write(tmp_path / "d.jsonl", rows)
    examples = load_sft_jsonl(tmp_path / "d.jsonl", template_dir=tmp_path)
    model, params = _model()
    tok, eos = _tok(), 1
    got = generation_metrics(CausalLM(model), params, tok, examples, eos_id=eos)
    exact, hits, total = 0, 0, 0
    for ex in examples:  # no cache, no padding: the whole sequence re-run for every token
        ids = tok.encode(ex.prompt).ids
        ref = tok.encode(ex.completion, add_special_tokens=False).ids
        out = []
        for _ in range(4):  # the longest reference + EOS
            logits = model.apply({"params": params}, jnp.asarray([ids + out]))
            nxt = int(np.argmax(np.asarray(logits)[0, -1]))
            if nxt == eos:
                break
            out.append(nxt)
        exact += out == ref
        hits += sum(a == b for a, b in zip(out, ref, strict=False))
        total += len(ref)
    assert got == {"exact_match": exact / 3, "token_accuracy": hits / total}


def test_train_reports_generation_exact_match_before_and_after(tmp_path, capsys):
    from jlora.cli import main

    out = tmp_path / "run"
    over = [
        "train.max_steps=2",
        "train.eval_generate=8",
        "model.random.num_hidden_layers=1",
        "data.test_split=null",
        "data.packing=true",
        f"output.dir={out}",
        "output.progress=true",
        "output.plot=false",
        "output.peft=false",
        "checkpoint.enabled=false",
    ]
    assert main(["train", "configs/llama-sft-tiny.yaml", "--set", *over]) == 0
    summary = json.loads((out / "summary.json").read_text())
    printed, bars = capsys.readouterr()
    for when in ("before", "after"):
        m = summary[when]["validation"]
        assert 0.0 <= m["exact_match"] <= 1.0 and 0.0 <= m["token_accuracy"] <= 1.0
        # the final table shows both, before and after (it showed neither)
        for key, label in (("exact_match", "exact match"), ("token_accuracy", "token accuracy")):
            row = f"{label} {when}".ljust(28) + f"{100 * m[key]:.2f}%".rjust(12)
            assert row + "   (greedy completions)" in printed.splitlines(), printed
    # a progress bar for every evaluation pass and for the generation, not only training
    for desc in ("evaluating validation:", "generating:", "evaluating validation at step 2:"):
        assert f"llama-sft-tiny: {desc}" in bars and "/128 [" in bars, bars
    assert "0/8 [" in bars
    assert 0.0 < summary["time_to_first_step_s"] < summary["wall_time_s"]


def test_complete_applies_the_tokenizer_dirs_chat_template(tmp_path):
    import shutil

    from jlora.train import load_config
    from jlora.train.engine.setup import base_tree
    from jlora.train.io.generate import complete

    shutil.copy(TOKENIZER, tmp_path / "tokenizer.json")
    template = (
        "{{ 'sort : ' + messages[0]['content'] }}{% if add_generation_prompt %} =>{% endif %}"
    )
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"chat_template": template}))
    over = ["model.random.num_hidden_layers=1"]
    plain = load_config("configs/llama-sft-tiny.yaml", overrides=over)
    chat = load_config(
        "configs/llama-sft-tiny.yaml",
        overrides=[*over, f"data.tokenizer={tmp_path}/tokenizer.json"],
    )
    tree = base_tree(plain)[1]
    want = complete(plain, tree, ["sort : 3 1 2 =>", "sort : 9 4 =>"], max_new_tokens=4)
    assert complete(chat, tree, ["3 1 2", "9 4"], max_new_tokens=4) == want
