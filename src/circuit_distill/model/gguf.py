"""GGUF checkpoints: check a ``.gguf`` file, dequantise it once into a float32 safetensors
checkpoint in the user's cache directory, and reuse that checkpoint on every later load.

The cache lives under ``$CIRCUIT_DISTILL_CACHE`` if set, else ``$XDG_CACHE_HOME/circuit-distill``,
else ``~/.cache/circuit-distill``; each checkpoint is ``gguf/<file stem>-<sha256 prefix>``, keyed by
the GGUF file's hash, so a changed file gets a new entry. A checkpoint is written into a temporary
directory beside its place and renamed into it, so an interrupted run never leaves half of one.
Dequantising needs the ``gguf`` package (``pip install gguf``); a cached checkpoint does not.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch

from ..errors import CircuitDistillError
from .arch import family_for

CACHE_ENV = "CIRCUIT_DISTILL_CACHE"
SOURCE_FILE = "gguf_source.json"
# general.architecture values whose transformers model_type differs from the GGUF name
MODEL_TYPES = {"gemma3": "gemma3_text", "qwen2moe": "qwen2_moe", "qwen3moe": "qwen3_moe"}


class GGUFError(CircuitDistillError):
    """A GGUF file that cannot be read (corrupt, truncated) or whose architecture cannot be dequantised."""


class MissingPackageError(CircuitDistillError):
    """A Python package that this route needs is not installed; the message says what to ``pip install``."""


@dataclass(frozen=True)
class GGUFSource:
    """One GGUF file: ``name`` (its file name), ``parts`` (the file itself, or pieces whose
    concatenation is it, as some PyPI packages ship it) and ``sha256`` (hex digest of the whole file)."""

    name: str
    parts: tuple[Path, ...]
    sha256: str

    @classmethod
    def from_file(cls, path: str | os.PathLike) -> GGUFSource:
        path = Path(path)
        return cls(path.name, (path,), file_sha256([path]))

    @property
    def key(self) -> str:
        """The cache entry's directory name: ``<file stem>-<first 16 hex digits of the sha256>``."""
        return f"{Path(self.name).stem}-{self.sha256[:16]}"


def file_sha256(parts: list[Path] | tuple[Path, ...]) -> str:
    """Hex sha256 of the concatenation of ``parts``."""
    digest = hashlib.sha256()
    for p in parts:
        with open(p, "rb") as f:
            while block := f.read(1 << 20):
                digest.update(block)
    return digest.hexdigest()


def cache_root() -> Path:
    """The cache directory (``$CIRCUIT_DISTILL_CACHE``, ``$XDG_CACHE_HOME/circuit-distill`` or
    ``~/.cache/circuit-distill``)."""
    if os.environ.get(CACHE_ENV):
        return Path(os.environ[CACHE_ENV]).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base).expanduser() / "circuit-distill"


def find_gguf(name_or_path: str | os.PathLike) -> GGUFSource | None:
    """The GGUF file named by ``name_or_path`` (a ``.gguf`` file, or a directory without a
    ``config.json`` holding exactly one), or None when it names something else."""
    p = Path(name_or_path).expanduser()
    if p.suffix == ".gguf" and not p.exists():
        raise CircuitDistillError(f"GGUF file {str(p)!r} does not exist")
    if p.is_file() and p.suffix == ".gguf":
        return GGUFSource.from_file(p)
    if p.is_dir() and not (p / "config.json").is_file():
        found = sorted(p.glob("*.gguf"))
        if len(found) > 1:
            raise CircuitDistillError(f"{p} holds {len(found)} GGUF files ({', '.join(f.name for f in found)}); "
                                      "pass the one to load")
        if found:
            return GGUFSource.from_file(found[0])
    return None


def require_gguf() -> None:
    """Raise ``MissingPackageError`` naming the install command when ``gguf`` is not importable."""
    if importlib.util.find_spec("gguf") is None:
        raise MissingPackageError("reading a GGUF file needs the gguf package: pip install gguf "
                                  "(or pip install 'circuit-distill[real]')")


def gguf_architecture(path: str | os.PathLike) -> str:
    """``general.architecture`` of a GGUF file, after reading the whole file's layout (so a corrupt or
    truncated file fails here with a ``GGUFError``, not halfway through dequantising)."""
    require_gguf()
    from gguf import GGUFReader

    try:
        reader = GGUFReader(str(path))
        field = reader.fields["general.architecture"]
        return bytes(field.parts[field.data[0]]).decode("utf-8")
    except Exception as e:  # the reader raises ValueError, IndexError, KeyError, ... on bad files
        raise GGUFError(f"{path} is not a readable GGUF file ({type(e).__name__}: {e}); it is corrupt or "
                        "truncated: download or reinstall it") from None


def check_architecture(architecture: str, path: str | os.PathLike) -> str:
    """The transformers ``model_type`` of a GGUF ``architecture``; ``GGUFError`` when transformers
    cannot dequantise it, ``UnsupportedModelError`` when circuit-distill has no family for it."""
    from transformers.modeling_gguf_pytorch_utils import GGUF_SUPPORTED_ARCHITECTURES

    readable = [a for a in GGUF_SUPPORTED_ARCHITECTURES if a not in ("general", "tokenizer")]
    model_type = MODEL_TYPES.get(architecture, architecture)
    if architecture not in readable and model_type not in readable:
        raise GGUFError(f"{path}: GGUF architecture {architecture!r} cannot be dequantised by transformers "
                        f"(it reads {', '.join(readable)}); convert the model to a Hugging Face directory instead")
    family_for(model_type)
    return model_type


def dequantised_checkpoint(source: GGUFSource) -> Path:
    """The float32 checkpoint directory of ``source``: from the cache, or dequantised into it now."""
    root = cache_root() / "gguf"
    final = root / source.key
    if (final / "config.json").is_file():
        return final
    root.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".tmp-{source.key}-", dir=root))
    try:
        path = source.parts[0] if len(source.parts) == 1 else assemble(source, tmp / source.name)
        model_type = check_architecture(gguf_architecture(path), source.name)
        dequantise(path, tmp)
        if path.parent == tmp:
            path.unlink()
        (tmp / SOURCE_FILE).write_text(json.dumps(
            {"gguf": source.name, "sha256": source.sha256, "model_type": model_type, "dtype": "float32",
             "note": "weights quantised upstream (GGUF), dequantised to float32 by circuit-distill"},
            indent=2) + "\n")
        try:
            os.rename(tmp, final)
        except OSError:
            if not (final / "config.json").is_file():  # not a concurrent writer's finished entry
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return final


def assemble(source: GGUFSource, out: Path) -> Path:
    """Concatenate ``source.parts`` into ``out`` and check the result's sha256."""
    with open(out, "wb") as f:
        for part in source.parts:
            with open(part, "rb") as src:
                shutil.copyfileobj(src, f, 1 << 20)
    if file_sha256([out]) != source.sha256:
        raise GGUFError(f"the parts of {source.name} do not add up to the expected file (sha256 mismatch); "
                        "reinstall the package that ships it")
    return out


def dequantise(path: Path, out: Path) -> None:
    """Load the GGUF file ``path`` with transformers (dequantising to float32) and save it, with its
    tokenizer, as a plain checkpoint in ``out``. transformers refuses to save a model it loaded from
    GGUF, so the weights move into a fresh model of the same config first."""
    require_gguf()
    from transformers import AutoModelForCausalLM, AutoTokenizer

    kw = {"gguf_file": str(path)}
    quantised = AutoModelForCausalLM.from_pretrained(path.parent, dtype=torch.float32, **kw)
    config = quantised.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    with torch.device("meta"):
        plain = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    plain.load_state_dict(quantised.state_dict(), assign=True)
    plain.tie_weights()
    plain.save_pretrained(out)
    del quantised, plain
    AutoTokenizer.from_pretrained(path.parent, **kw).save_pretrained(out)
