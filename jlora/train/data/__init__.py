"""The data of a run, shared by the objectives: splits, batches, tokens, packing, mixing, SFT.

* `jlora.train.data.splits`: `Split` (a tokenized split), ``labels.json`` and JSON-lines files,
  synthetic token data.
* `jlora.train.data.batching`: the seeded training order (`Batcher`) and the fixed-shape train
  and evaluation batches.
* `jlora.train.data.tokenize`: the run's tokenizer, padding, the text splits of a run.
* `jlora.train.data.packing`: several short texts per row (classification batches).
* `jlora.train.data.shapes`: the train-batch sizes planned for a run (fewer programs).
* `jlora.train.data.sft`: prompt/completion and chat data (causal LM).
* `jlora.train.data.mixing`: several tasks' data in one run (multitask).

>>> from jlora.train import data
>>> data.Batcher(10, 4, seed=0).steps_per_epoch
2
"""

from jlora.train.data.batching import (
    Batcher,
    bucket_length,
    eval_batches,
    step_length,
    train_batch,
)
from jlora.train.data.mixing import MixingBatcher, concat, mixing_probs, task_weights
from jlora.train.data.splits import Split, load_jsonl, load_labels, synthetic_lm
from jlora.train.data.tokenize import padded_length, tokenize

__all__ = [
    "Batcher",
    "MixingBatcher",
    "Split",
    "bucket_length",
    "concat",
    "eval_batches",
    "load_jsonl",
    "load_labels",
    "mixing_probs",
    "padded_length",
    "step_length",
    "synthetic_lm",
    "task_weights",
    "tokenize",
    "train_batch",
]
