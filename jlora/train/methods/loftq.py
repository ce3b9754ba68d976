"""LoftQ in `jlora train` (the `LoftQ` method): QLoRA whose adapters start from the NF4 error.

A run selects LoftQ with ``lora.init: loftq``; the section then parses to a
`jlora.variants.loftq.LoftQConfig` (``lora.loftq_iter``, ``lora.loftq_bits``,
``lora.block_size``; `jlora.train.methods.base.Method.parse`). `jlora.init` quantizes each
targeted W to NF4 itself and fits the adapters to what that quantization lost, so a LoftQ run is
a QLoRA run: it needs ``model.quantize: nf4`` (`LoftQ.check_run`), and the trainer keeps LoftQ's
NF4 residual as the frozen base (`jlora.train.engine.model.quantize_base` leaves a W the init
quantized as it is). Without ``model.quantize: nf4`` the run is refused rather than quantized
behind the user's back; ``model.double_quant`` is refused too (the adapters correct the residual
with plain float block constants).

The adapters are plain LoRA factors, exported as PEFT LoRA (``init_lora_weights: true``: PEFT
must not run LoftQ again when it loads them). They correct LoftQ's residual ``deq(Q)``, not the
pretrained W (``W + s·B·A`` would count the correction twice), so the PEFT export writes that base
too (`LoftQ.peft_base`): ``<peft dir>/base/`` holds the model with ``deq(Q)`` in the adapted
kernels' place, in float, and the adapter names it as its ``base_model_name_or_path``, as PEFT's
own LoftQ recipe saves the base beside the adapter.

Example:
  >>> from jlora.train.methods import lora_section, method_for
  >>> cfg = lora_section({"init": "loftq", "rank": 4, "targets": ["q"], "loftq_iter": 2})
  >>> type(cfg).__name__, cfg.loftq_iter, type(method_for(cfg)).__name__
  ('LoftQConfig', 2, 'LoftQ')
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jlora
from jlora.train.methods.base import Method, register_method
from jlora.train.sections import ConfigError

__all__ = ["LoftQ"]


@register_method("loftq")
@dataclasses.dataclass(frozen=True)
class LoftQ(Method):
    """LoftQ's requirements on the run (module docstring); ``config`` is a
    `jlora.variants.loftq.LoftQConfig`."""

    title = "LoftQ"
    selector = "init"

    @classmethod
    def check_run(cls, run: Any) -> None:
        """Refuse a run without ``model.quantize: nf4`` or with ``model.double_quant``.

        Raises:
          ConfigError: ``model.quantize`` is not ``nf4``, or ``model.double_quant`` is set.
        """
        m = run.model
        if m.quantize != "nf4":
            raise ConfigError(
                f"lora.init: loftq needs model.quantize: nf4 (got {m.quantize!r}): LoftQ "
                "quantizes the targeted W to NF4 itself and fits the adapters to that quantized "
                "base, so the run trains on the NF4 base; set model.quantize: nf4, or use "
                "another lora.init"
            )
        if m.double_quant:
            raise ConfigError(
                "lora.init: loftq takes no model.double_quant: LoftQ's adapters are fitted to "
                "the NF4 residual with float block constants, which double quantization would "
                "change; set model.double_quant: false"
            )

    def peft_base(self, tree: Any) -> Any:
        """``tree`` with the adapters off (`jlora.base`): the NF4 residual ``deq(Q)`` of each
        target (dequantized when the export merges it), the other leaves as trained."""
        return jlora.base(tree)
