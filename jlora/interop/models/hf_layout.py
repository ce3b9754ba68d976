"""Where each flax leaf of the reference models lives in a Hugging Face checkpoint.

A leaf is read from one or more HF tensors (*pieces*) in torch layout:

* a Linear kernel ``(in, out)`` is torch's ``(out, in)`` transposed; an MoE expert parameter
  ``experts/<name>`` ``(E, in, out)`` is torch's fused ``(E, out, in)`` transposed per expert;
* a leaf under a scanned ``layers`` stack (``scan_layers=True``) has a leading layer axis: piece
  ``i`` is the tensor of ``model.layers.<i>.…``;
* MoE experts are written by transformers one tensor per expert (``experts.<e>.gate_proj`` /
  ``up_proj`` / ``down_proj``, Mixtral's ``block_sparse_moe.experts.<e>.w1`` / ``w3`` / ``w2``),
  gate and up stacked into the rows of ``gate_up_proj``; the fused names (transformers' in-memory
  ``mlp.experts.gate_up_proj``) are read too. `leaf_pieces` lists the alternatives, the format
  transformers writes last.

`to_hf_state_dict` writes the in-memory names (one tensor per leaf and layer), which
transformers loads as they are.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Callable, Mapping
from typing import Any

import jax
import numpy as np

from jlora.interop.models.moe import legacy_expert_pieces

__all__ = ["Piece", "flat_params", "hf_name", "leaf_pieces", "to_flax", "to_hf_state_dict"]

Path = tuple[str, ...]


@dataclasses.dataclass(frozen=True)
class Piece:
    """One HF tensor of a leaf: its name, where it goes in the leaf's torch-layout array (the
    leading stacked ``index``, then ``rows`` of the next axis) and its torch shape."""

    name: str
    index: tuple[int, ...]
    rows: tuple[int, int] | None
    shape: tuple[int, ...]


def is_matrix(path: Path) -> bool:
    """A Linear kernel or an MoE expert parameter: its last two axes are torch's swapped."""
    return path[-1] == "kernel" or (len(path) >= 2 and path[-2] == "experts")


def is_stacked(path: Path) -> bool:
    """Under a scanned ``layers`` stack (a leading layer axis)."""
    return "layers" in path[:-1]


def to_flax(path: Path, x: np.ndarray) -> np.ndarray:
    """A leaf from its torch-layout array (and back: the map is its own inverse)."""
    return np.swapaxes(x, -1, -2) if is_matrix(path) and x.ndim >= 2 else x


def hf_name(path: Path, layer: int | None = None) -> str:
    """The HF name of a leaf (``layer``: the index in a scanned stack).

    Example:
      >>> hf_name(("model", "layers_0", "mlp", "up_proj", "kernel"))
      'model.layers.0.mlp.up_proj.weight'
      >>> hf_name(("model", "layers", "mlp", "experts", "gate_up_proj"), layer=2)
      'model.layers.2.mlp.experts.gate_up_proj'
    """
    *mods, leaf = path
    mods = [f"layers.{layer}" if m == "layers" else re.sub(r"^(layers?)_(\d+)$", r"\1.\2", m)
            for m in mods]  # fmt: skip
    if mods and mods[-1] == "experts":
        return ".".join([*mods, leaf])
    return ".".join([*mods, "bias" if leaf == "bias" else "weight"])


def _one_layer(path: Path, layer: int | None, shape: tuple[int, ...], model_type: str) -> list:
    """Alternatives (each a list of pieces) for one layer's torch-layout array of ``shape``."""
    name = hf_name(path, layer)
    alts = [[Piece(name, (), None, shape)]]
    if len(path) >= 2 and path[-2] == "experts":
        legacy = legacy_expert_pieces(name, path[-1], shape, model_type)
        alts += [[Piece(n, idx, rows, s) for n, idx, rows, s in legacy]] if legacy else []
    elif model_type == "mixtral" and ".mlp.gate." in name:
        alts.append([Piece(name.replace(".mlp.", ".block_sparse_moe."), (), None, shape)])
    return alts


def leaf_pieces(path: Path, shape: tuple[int, ...], model_type: str = "") -> list[list[Piece]]:
    """The ways a leaf of flax ``shape`` can be stored: each a complete list of pieces.

    Example:
      >>> alts = leaf_pieces(("model", "layers", "self_attn", "q_proj", "kernel"), (2, 8, 4))
      >>> [(p.name, p.index, p.shape) for p in alts[0]]
      [('model.layers.0.self_attn.q_proj.weight', (0,), (4, 8)), ('model.layers.1.self_attn.q_proj.weight', (1,), (4, 8))]
    """
    tshape = tuple(to_flax(path, np.empty(shape, np.bool_)).shape)
    if not is_stacked(path):
        return _one_layer(path, None, tshape, model_type)
    per_layer = [_one_layer(path, i, tshape[1:], model_type) for i in range(tshape[0])]
    return [
        [dataclasses.replace(p, index=(i, *p.index)) for i, alts in enumerate(per_layer)
         for p in alts[k]]
        for k in range(len(per_layer[0]))
    ]  # fmt: skip


def assemble(path: Path, shape: tuple[int, ...], pieces: list[Piece], read: Callable) -> Any:
    """The leaf from its pieces (``read(name)`` gives a piece's array)."""
    out = None
    for p in pieces:
        x = np.asarray(read(p.name))
        if len(pieces) == 1 and not p.index and p.rows is None:
            return to_flax(path, x)
        if out is None:
            out = np.empty(tuple(to_flax(path, np.empty(shape, np.bool_)).shape), x.dtype)
        where = (*p.index, slice(*p.rows)) if p.rows else p.index
        out[where] = x
    return to_flax(path, out)


def flat_params(params: Mapping[str, Any]) -> dict[Path, Any]:
    """``{path: leaf}`` of a params tree (with or without the ``"params"`` level)."""
    params = params.get("params", params)
    leaves = jax.tree_util.tree_leaves_with_path(params)
    return {tuple(k.key for k in kp): v for kp, v in leaves}


def to_hf_state_dict(params: Mapping[str, Any]) -> dict[str, np.ndarray]:
    """Flax params (with or without the ``"params"`` level) → HF-named numpy arrays.

    The inverse of the loader's mapping (Linear kernels transposed back to ``(out, in)``, a
    scanned stack split into its layers, MoE experts under transformers' fused in-memory names);
    save it with ``safetensors.numpy.save_file`` next to the original ``config.json`` (cast
    bfloat16 params to float32 first: safetensors' numpy backend has no bfloat16).

    Example:
      >>> from jlora.interop.models.hub import init_params
      >>> from jlora.interop.models.llama import LlamaConfig
      >>> params = init_params(LlamaConfig(16, 8, 16, 1, 2), key=jax.random.key(0))
      >>> sd = to_hf_state_dict(params)
      >>> sd["model.layers.0.mlp.down_proj.weight"].shape, "lm_head.weight" in sd
      ((8, 16), True)
    """
    out = {}
    for path, value in flat_params(params).items():
        t = to_flax(path, np.asarray(value))
        for p in leaf_pieces(path, np.shape(value))[0]:
            out[p.name] = np.ascontiguousarray(t[p.index])
    return out
