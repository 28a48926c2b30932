"""Atomic file writes: write beside the target, then ``os.replace`` it, so an interrupted run never
leaves a half-written checkpoint, cache shard, config or report behind."""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from pathlib import Path


def atomic_write(path: str | os.PathLike, write: Callable[[Path], object]) -> Path:
    """Call ``write(tmp_path)`` then move the result onto ``path`` (parents are created), with the mode
    a new file gets under the process umask."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    write(tmp)
    os.chmod(tmp, 0o666 & ~_umask())  # some writers (safetensors) create 0600 files: give the usual mode
    os.replace(tmp, path)
    return path


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def atomic_write_text(path: str | os.PathLike, text: str) -> Path:
    return atomic_write(path, lambda tmp: tmp.write_text(text))


def atomic_write_json(path: str | os.PathLike, obj, **dumps_kw) -> Path:
    """``json.dumps(obj, indent=2, **dumps_kw)`` plus a final newline, written atomically."""
    dumps_kw.setdefault("indent", 2)
    return atomic_write_text(path, json.dumps(obj, **dumps_kw) + "\n")
