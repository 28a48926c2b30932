"""The progress bar of discovery's long loops (sweeps, patching, pruning)."""

from __future__ import annotations


def progress_bar(progress: bool | None, total: int, desc: str):
    """A ``tqdm`` bar over ``total`` steps; ``progress=None`` shows it only for 32 steps or more."""
    from tqdm.auto import tqdm

    show = progress if progress is not None else total >= 32
    return tqdm(total=total, desc=desc, disable=not show, leave=False)
