"""Helpers shared by the benchmark scripts: timing side by side and writing results."""

from __future__ import annotations

import json
import platform
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import torch

RESULTS = Path(__file__).resolve().parent / "results"


def interleaved_runs(fns: dict[str, Callable[[], object]], repeats: int, warmup: int = 1
                     ) -> dict[str, list[tuple[float, object]]]:
    """Run the functions round-robin (so machine noise hits all of them alike) after ``warmup`` rounds;
    per function, ``(wall seconds, return value)`` of every timed call."""
    for _ in range(warmup):
        for fn in fns.values():
            fn()
    runs: dict[str, list[tuple[float, object]]] = {k: [] for k in fns}
    for _ in range(repeats):
        for k, fn in fns.items():
            t0 = time.perf_counter()
            out = fn()
            runs[k].append((time.perf_counter() - t0, out))
    return runs


def interleaved_medians(fns: dict[str, Callable[[], object]], repeats: int, warmup: int = 1) -> dict[str, float]:
    """Median wall time of each function, run round-robin (``interleaved_runs``)."""
    return {k: statistics.median(t for t, _ in v) for k, v in interleaved_runs(fns, repeats, warmup).items()}


def machine() -> dict:
    return {"python": platform.python_version(), "torch": torch.__version__, "threads": torch.get_num_threads(),
            "cpu": platform.processor() or platform.machine()}


def write_results(name: str, data: dict) -> Path:
    RESULTS.mkdir(parents=True, exist_ok=True)
    path = RESULTS / f"{name}.json"
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps({**data, "machine": machine()}, indent=2) + "\n")
    tmp.replace(path)
    return path


def print_table(rows: list[tuple], headers: tuple) -> None:
    widths = [max(len(str(x)) for x in col) for col in zip(headers, *rows)]
    line = "  ".join(f"{{:<{w}}}" for w in widths)
    print(line.format(*headers))
    print(line.format(*("-" * w for w in widths)))
    for r in rows:
        print(line.format(*r))
