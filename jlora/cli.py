"""The ``jlora`` command: ``train``, ``info``, ``merge``, ``export-peft``, ``import-peft`` and
``generate``.

Every subcommand reads a run config (YAML; see ``configs/``) for the base model, accepts
``--set key.sub=value`` overrides (values parsed as YAML), and explains its options with
``--help``. Exit codes: 0 success; 2 usage or config error, or a malformed file (a corrupt
safetensors or checkpoint, invalid JSON, a value of the wrong type: one line on stderr naming the
file and key, no traceback; set ``JLORA_TRACEBACK=1`` to see it; also when the ``train`` extra,
``pip install "jlora[train]"``, is not installed, and when another run holds ``output.dir``); 1 a
run that failed (e.g. a NaN loss; one line on stderr).
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import sys
from collections.abc import Sequence
from typing import Any

__all__ = ["main"]

#: the modules of the ``train`` extra (pyproject.toml) that the commands need
TRAIN_EXTRA = ("yaml", "tokenizers", "tqdm", "matplotlib")

EXAMPLES = """examples:
  jlora train configs/llama-tiny.yaml
  jlora train configs/minilm-lora.yaml --set optim.lr=1e-3 train.epochs=2
  jlora train configs/llama-tiny.yaml --resume
  jlora train configs/minilm-lora.yaml --overwrite    # the old run moves to runs/minilm-lora.old
  jlora info configs/minilm-lora.yaml
  jlora export-peft configs/minilm-lora.yaml --out runs/minilm-lora/peft-step150 --step 150
  jlora import-peft configs/minilm-lora.yaml --peft path/to/peft_dir --out runs/imported
  jlora merge configs/minilm-lora.yaml --out runs/minilm-lora/merged
  jlora generate configs/llama-sft-tiny.yaml --adapter runs/llama-sft-tiny --prompt "sort : 3 1 2 =>"
"""


def _config_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("config", help="run config YAML file (e.g. configs/llama-tiny.yaml)")
    p.add_argument(
        "--set",
        dest="overrides",
        metavar="KEY=VALUE",
        nargs="+",
        action="extend",
        default=[],
        help="override config values by dotted key, e.g. --set optim.lr=3e-4 train.epochs=2 "
        "(values are parsed as YAML; give CONFIG first)",
    )


def _checkpoint_args(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--checkpoint",
        metavar="DIR",
        help="Orbax adapter checkpoint directory (default: the config's checkpoint.dir, i.e. "
        "<output.dir>/checkpoints)",
    )
    p.add_argument("--step", type=int, help="checkpoint step to read (default: the latest)")


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of ``jlora`` (one subparser per command)."""
    parser = argparse.ArgumentParser(
        prog="jlora",
        description="LoRA fine-tuning for JAX/Flax: train from a YAML config, inspect it, and "
        "move adapters between Orbax checkpoints, PEFT directories and merged models.",
        epilog=EXAMPLES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    _add_train(sub)
    _add_info(sub)
    _add_merge(sub)
    _add_export_peft(sub)
    _add_import_peft(sub)
    _add_generate(sub)
    return parser


def _add_train(sub: Any) -> None:
    """The ``train`` subcommand."""
    p = sub.add_parser(
        "train",
        help="fine-tune with LoRA as a config says",
        description="Fine-tune with LoRA as CONFIG says: evaluate before, train (checkpointing "
        "every checkpoint.every_steps), evaluate after, and write metrics.jsonl, loss.png, "
        "summary.json, the Orbax checkpoints and a PEFT export under output.dir.",
    )
    _config_args(p)
    again = p.add_mutually_exclusive_group()
    again.add_argument(
        "--overwrite",
        action="store_true",
        help="start over in an output.dir that holds a run: the old run is moved aside to "
        "<output.dir>.old (.old.1, ... when taken; a checkpoint.dir outside it too), never "
        "deleted",
    )
    again.add_argument(
        "--resume",
        action="store_true",
        help="continue from the newest checkpoint step in the checkpoint directory that verifies "
        "(damaged newer steps are reported and set aside, never deleted); a checkpoint without "
        "optimizer state, e.g. from import-peft, continues with a fresh one (without --resume, "
        "a run directory that holds checkpoints or outputs is an error)",
    )


def _add_info(sub: Any) -> None:
    """The ``info`` subcommand."""
    p = sub.add_parser(
        "info",
        help="show the model, LoRA targets and trainable-parameter report of a config",
        description="Show the base model, the LoRA targets (grouped across layers), the "
        "trainable-parameter report and the adapter size in bytes. Loads no weights.",
    )
    _config_args(p)


def _add_merge(sub: Any) -> None:
    """The ``merge`` subcommand."""
    p = sub.add_parser(
        "merge",
        help="merge adapters into the base weights and save the plain model",
        description="Merge adapters (from an Orbax checkpoint, or a PEFT directory with --peft) "
        "into the config's base model and save it: W' = W + scale * A @ B.",
    )
    _config_args(p)
    _checkpoint_args(p)
    p.add_argument(
        "--peft",
        metavar="DIR",
        help="read the adapters from this PEFT directory instead of a checkpoint",
    )
    p.add_argument("--out", required=True, metavar="DIR", help="output directory")
    p.add_argument(
        "--format",
        choices=("hf", "flax"),
        default="hf",
        help="hf: config.json + model.safetensors with Hugging Face tensor names (default); "
        "flax: model.safetensors keyed by flax parameter paths",
    )


def _add_export_peft(sub: Any) -> None:
    """The ``export-peft`` subcommand."""
    p = sub.add_parser(
        "export-peft",
        help="Orbax adapter checkpoint -> PEFT adapter directory",
        description="Write the adapters of an Orbax adapter checkpoint as a Hugging Face PEFT "
        "LoRA directory (adapter_config.json + adapter_model.safetensors).",
    )
    _config_args(p)
    _checkpoint_args(p)
    p.add_argument("--out", required=True, metavar="DIR", help="output PEFT directory")


def _add_import_peft(sub: Any) -> None:
    """The ``import-peft`` subcommand."""
    p = sub.add_parser(
        "import-peft",
        help="PEFT adapter directory -> Orbax adapter checkpoint",
        description="Load a Hugging Face PEFT LoRA directory onto the config's base model and "
        "save it as an Orbax adapter checkpoint. Every tensor is checked first (floating point, "
        "finite, one dtype). The checkpoint has no optimizer state: `jlora train --resume` with "
        "it as checkpoint.dir continues from it with a fresh optimizer state; export-peft and "
        "merge read it.",
    )
    _config_args(p)
    p.add_argument("--peft", required=True, metavar="DIR", help="PEFT adapter directory")
    p.add_argument("--out", required=True, metavar="DIR", help="output checkpoint directory")
    p.add_argument("--step", type=int, default=0, help="step number to save under (default 0)")


def _add_generate(sub: Any) -> None:
    """The ``generate`` subcommand."""
    p = sub.add_parser(
        "generate",
        help="complete prompts with the config's model (and adapters)",
        description="Complete each --prompt with the config's base model, with the adapters of a "
        "run directory's newest checkpoint (--adapter) or a PEFT directory (--peft), and print "
        "one completion per prompt. The chat template of the tokenizer's directory is applied "
        "when it has one. Greedy by default.",
    )
    _config_args(p)
    p.add_argument("--prompt", action="append", required=True, help="a prompt (repeatable)")
    src = p.add_mutually_exclusive_group()
    src.add_argument("--adapter", metavar="RUN_DIR", help="a jlora train output directory")
    src.add_argument("--peft", metavar="DIR", help="a PEFT adapter directory")
    p.add_argument(
        "--max-new-tokens",
        type=int,
        default=32,
        help="tokens to add (default 32); the prompt and these fit in the model's "
        "max_position_embeddings",
    )
    p.add_argument("--temperature", type=float, default=0.0, help="0: greedy (default)")
    p.add_argument("--top-p", type=float, default=None, help="nucleus sampling threshold")
    p.add_argument("--seed", type=int, default=0, help="sampling seed (default 0)")


def _generate(args: argparse.Namespace, cfg) -> int:
    from jlora.train.engine.model import param_shapes
    from jlora.train.engine.setup import base_tree
    from jlora.train.io import export
    from jlora.train.io.generate import complete
    from jlora.train.objectives import objective_class

    if not objective_class(cfg).generates(cfg):
        raise ValueError(
            f"generate needs a decoder config (model.task: causal_lm); {args.config} has "
            f"model.task: {cfg.model.task}, an encoder that cannot generate text"
        )
    for i, prompt in enumerate(args.prompt, 1):
        if not prompt.strip():
            raise ValueError(f"--prompt number {i} is empty: give the text to continue")
    limit = getattr(param_shapes(cfg.model, None)[0].config, "max_position_embeddings", None)
    if limit is not None and args.max_new_tokens >= limit:  # before any weight is loaded
        raise ValueError(
            f"--max-new-tokens {args.max_new_tokens}: the model has max_position_embeddings="
            f"{limit} positions for the prompt and the new tokens: ask for fewer than {limit}"
        )
    if args.adapter:
        ckdir = os.path.join(args.adapter, "checkpoints")
        if not os.path.isdir(ckdir):
            raise ValueError(f"--adapter {args.adapter}: no checkpoints directory there")
        tree = export.from_checkpoint(cfg, ckdir)[0]
    elif args.peft:
        tree = export.from_peft(cfg, args.peft)[0]
    else:
        tree = base_tree(cfg)[1]
    try:
        texts = complete(
            cfg,
            tree,
            args.prompt,
            max_new_tokens=args.max_new_tokens,
            temperature=args.temperature,
            top_p=args.top_p,
            seed=args.seed,
        )
    except (RuntimeError, MemoryError) as e:  # e.g. XLA's RESOURCE_EXHAUSTED: one line, exit 1
        if os.environ.get("JLORA_TRACEBACK"):
            raise
        first = next((ln.strip() for ln in str(e).splitlines() if ln.strip()), type(e).__name__)
        return _fail(f"generation failed: {first}", 1)
    for text in texts:
        print(text)
    return 0


def _checkpoint_dir(cfg, given: str | None) -> str:
    if given:
        return given
    if cfg.checkpoint.dir:
        return cfg.checkpoint.dir
    return f"{cfg.output.resolved_dir(cfg.name)}/checkpoints"


def _info(cfg) -> None:
    import re

    import jax

    import jlora
    from jlora.train.engine.setup import base_tree

    objective, _, tree = base_tree(cfg, shapes_only=True)
    groups: dict[tuple, int] = {}
    for path, x in jax.tree_util.tree_flatten_with_path(tree, is_leaf=_is_node)[0]:
        if isinstance(x, jlora.LoraWeight):
            key = (re.sub(r"_\d+/", "_*/", jlora.path_str(path)), tuple(x.shape), x.rank, x.scale)
            groups[key] = groups.get(key, 0) + 1
    s = jlora.summary(tree)
    m = cfg.model
    print(f"name:    {cfg.name}")
    print(
        f"model:   {m.path or 'random ' + str(m.random.get('model_type'))} "
        f"({type(objective.model).__name__}, task {m.task}, compute {m.dtype}, "
        f"params {m.param_dtype})"
    )
    print(f"targets: {s.targets} LoRA weights")
    for (path, shape, r, scale), n in groups.items():
        print(f"  {path:60s} x{n:<3d} shape {shape}  rank {r}  scale {scale:g}")
    trainables = [
        jlora.path_str(p)
        for p, x in jax.tree_util.tree_flatten_with_path(tree, is_leaf=_is_node)[0]
        if isinstance(x, jlora.Trainable)
    ]
    if trainables:
        print(f"fully trained: {', '.join(trainables)}")
    print(f"trainable params: {s.trainable:,} of {s.base:,} base params ({s.percent:.4f}%)")
    print(
        f"adapter size: {s.adapter_bytes:,} bytes ({s.adapter:,} adapter params, {cfg.lora.dtype})"
    )


def _is_node(x) -> bool:
    import jlora

    return isinstance(x, jlora.LoraWeight | jlora.Trainable)


def _run(args: argparse.Namespace) -> int:
    missing = _missing_train_module()
    if missing is None:
        try:
            return _command(args)
        except ModuleNotFoundError as e:
            if (e.name or "").partition(".")[0] not in TRAIN_EXTRA:
                raise
            missing = e.name
    print(
        f"jlora: the command line needs the 'train' extra: pip install \"jlora[train]\" "
        f"(missing module: {missing})",
        file=sys.stderr,
    )
    return 2


def _missing_train_module() -> str | None:
    """The first module of the ``train`` extra that cannot be imported (None: all can)."""
    for name in TRAIN_EXTRA:
        try:
            if importlib.util.find_spec(name) is None:
                return name
        except ValueError:  # in sys.modules without a __spec__: importable
            pass
    return None


def _command(args: argparse.Namespace) -> int:
    # The training stack (YAML, tokenizers, the trainer) is imported only when a command runs,
    # so that `import jlora.cli` and `jlora --help` stay light.
    from jlora.train import NonFiniteLossError, load_config, train

    try:  # configuration: any ValueError / TypeError here is the user's to fix
        cfg = load_config(args.config, args.overrides)
    except FileNotFoundError as e:
        return _fail(f"{e.strerror}: {e.filename}", 2)
    except (ValueError, TypeError) as e:
        if os.environ.get("JLORA_TRACEBACK"):
            raise
        return _fail(str(e), 2)
    try:
        if args.command == "train":
            from jlora.train.engine.compiles import enable_compile_cache

            enable_compile_cache(cfg.train.compile_cache_dir)  # before anything compiles
            train(cfg, resume=args.resume, overwrite=args.overwrite)
        elif args.command == "info":
            _info(cfg)
        elif args.command == "generate":
            return _generate(args, cfg)
        else:
            return _adapters(args, cfg)
    except NonFiniteLossError as e:
        return _fail(str(e), 1)
    except (ValueError, TypeError, NotImplementedError) as e:
        if os.environ.get("JLORA_TRACEBACK"):
            raise
        return _fail(str(e), 2)
    except OSError as e:  # a file that cannot be read or written (permissions, a file for a dir)
        if os.environ.get("JLORA_TRACEBACK"):
            raise
        return _fail(f"{e.strerror or e}: {e.filename}" if e.filename else str(e), 2)
    return 0


def _adapters(args: argparse.Namespace, cfg) -> int:
    from jlora.train.io import export

    if os.path.exists(args.out) and not os.path.isdir(args.out):
        raise ValueError(f"--out {args.out} is an existing file; expected a directory")
    if args.command == "import-peft":
        export.check_importable(cfg, args.peft)
        tree, lcfg = export.from_peft(cfg, args.peft)
        export.to_checkpoint(args.out, tree, lcfg, step=args.step)
        print(f"wrote adapter checkpoint step {args.step} to {args.out}")
        return 0
    if args.command == "merge" and args.peft:
        tree, _ = export.from_peft(cfg, args.peft)
        source = args.peft
    else:
        ckdir = _checkpoint_dir(cfg, args.checkpoint)
        tree, lcfg, step = export.from_checkpoint(cfg, ckdir, step=args.step)
        source = f"{ckdir} step {step}"
    if args.command == "export-peft":
        how = export.to_peft(cfg, args.out, tree, lcfg)
        print(f"wrote PEFT adapter from {source} to {args.out}: {how}")
    else:
        file = export.save_merged(cfg, tree, args.out, fmt=args.format)
        print(f"wrote merged model from {source} to {file}")
    return 0


def _fail(message: str, code: int) -> int:
    line = "; ".join(part.strip() for part in message.strip().splitlines() if part.strip())
    print(f"jlora: error: {line}", file=sys.stderr)
    return code


def main(argv: Sequence[str] | None = None) -> int:
    """Run the ``jlora`` command line; returns the exit code.

    Example:
      >>> main(["info", "configs/llama-tiny.yaml", "--set", "lora.rank=4"])  # doctest: +ELLIPSIS
      name:    llama-tiny
      ...
      0
    """
    args = build_parser().parse_args(argv)
    return _run(args)


if __name__ == "__main__":
    sys.exit(main())
