"""Shared fixtures: the float64 numpy references and the Hugging Face helpers.

Test modules never import each other (nor these helper modules): what they share comes from
here as fixtures.

* ``np_ref``: `_reference` -- ``np_ref.f64``, ``np_ref.delta(lw)`` (s·a@b in W's layout),
  ``np_ref.merged(lw)`` (W + s·a@b), ``np_ref.dequantize(w)`` (int8 / NF4 from their codes),
  ``np_ref.randomize(tree)`` (random non-zero a and b).
* ``require``: import a module, skipping the test when it is missing (failing under ``CI``).
* ``hf``: `_hf_utils` -- tiny random Hugging Face models (``hf.tiny_causal_lm()``, ...).

A ``chex.TestCase`` (a unittest class, whose methods take no fixtures) gets them as attributes
with ``@pytest.mark.usefixtures("np_ref_attr")``: ``self.np_ref``.
"""

from __future__ import annotations

import os

import _hf_utils
import _reference
import pytest


@pytest.fixture(scope="session", autouse=True)
def _private_cache_home(tmp_path_factory):
    """``XDG_CACHE_HOME`` in a temporary directory: the ``jlora`` command's default persistent
    compilation cache (``train.compile_cache_dir: auto``) never writes to the user's home."""
    old = os.environ.get("XDG_CACHE_HOME")
    os.environ["XDG_CACHE_HOME"] = str(tmp_path_factory.mktemp("xdg-cache"))
    yield
    if old is None:
        os.environ.pop("XDG_CACHE_HOME", None)
    else:
        os.environ["XDG_CACHE_HOME"] = old


@pytest.fixture(scope="session")
def np_ref():
    """The float64 numpy references (module `tests/_reference.py`)."""
    return _reference


@pytest.fixture(scope="class")
def np_ref_attr(request):
    """``self.np_ref`` on a test class (for ``chex.TestCase`` methods)."""
    request.cls.np_ref = _reference


@pytest.fixture(scope="session")
def require():
    """``require(name)``: the module, or a skip (a failure under ``CI``) when it is missing."""
    return _hf_utils.require


@pytest.fixture(scope="session")
def hf():
    """Tiny random Hugging Face models and their configs (module `tests/_hf_utils.py`)."""
    return _hf_utils


@pytest.fixture(scope="module")
def hf_base(tmp_path_factory, hf):
    """A tiny transformers Llama saved as safetensors, once per test module."""
    hf.require("torch")
    path = tmp_path_factory.mktemp("llama")
    hf.tiny_causal_lm().save_pretrained(path, safe_serialization=True)
    return path
