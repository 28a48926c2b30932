"""Fine-tuned models shipped as a small delta on a base model: LoRA factors in one safetensors file.

A fine-tuning run (``training.finetune``) trains LoRA adapters (``distill.trainable``, peft) and keeps
only them: for each adapted linear module, ``A [r, in]`` and ``B [out, r]`` and its ``scale``
(``lora_alpha / r``). ``merge_delta`` adds ``scale * B @ A`` to the module's weight (transposed for
GPT-2's ``Conv1D``, whose weight is ``[in, out]``), the same product peft's own merge uses, so the
merged model computes what the adapted one did (to float rounding). The fine-tuned model *is* the
merged one: ``finetune`` evaluates ``base + merge_delta`` as loaded from the files, and loading the
shipped delta onto the base gives those weights bit for bit.

``TUNED`` names the shipped deltas: ``load_model("gemma3-270m-et")`` loads its base (the packaged
``gemma3-270m``) and merges ``assets/gemma3-270m-et/delta.safetensors`` into it.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from ..errors import ModelLoadError
from ..files import atomic_write

DELTA_FILE = "delta.safetensors"
FORMAT = "circuit-distill-lora-delta/1"


@dataclass(frozen=True)
class TunedModel:
    """A shipped fine-tuned model: ``name`` (its short name), ``base`` (the model the delta applies to,
    any name ``load_model`` takes), ``asset`` (its directory under the package's ``assets/``) and
    ``summary`` (one line)."""

    name: str
    base: str
    asset: str
    summary: str


TUNED: dict[str, TunedModel] = {
    "gemma3-270m-et": TunedModel(
        "gemma3-270m-et", "gemma3-270m", "gemma3-270m-et",
        "Gemma 3 270M + LoRA (q/o projections) fine-tuned on entity tracking (gold answers)"),
    "smollm2-135m-et": TunedModel(
        "smollm2-135m-et", "smollm2-135m", "smollm2-135m-et",
        "SmolLM2 135M + LoRA (q/o projections) fine-tuned on entity tracking (gold answers)"),
}


def is_tuned(name) -> bool:
    return str(name) in TUNED


@dataclass
class Delta:
    """LoRA factors per module name: ``factors[name] = (A [r, in], B [out, r])``, ``scales[name]`` the
    LoRA scale, ``fan_in_fan_out`` True if the modules store ``[in, out]`` weights (GPT-2 ``Conv1D``),
    ``meta`` free-form strings (the base model, how it was trained)."""

    factors: dict[str, tuple[torch.Tensor, torch.Tensor]]
    scales: dict[str, float]
    fan_in_fan_out: bool = False
    meta: dict | None = None

    @property
    def n_params(self) -> int:
        return sum(a.numel() + b.numel() for a, b in self.factors.values())

    def weight_delta(self, name: str) -> torch.Tensor:
        """``scale * B @ A`` of module ``name``: ``[out, in]`` (``[in, out]`` with ``fan_in_fan_out``)."""
        a, b = self.factors[name]
        d = (b.float() @ a.float()) * self.scales[name]
        return d.T if self.fan_in_fan_out else d


def lora_delta(hf: nn.Module, meta: dict | None = None) -> Delta:
    """The ``Delta`` of the LoRA adapters (adapter ``default``) injected into ``hf`` (float32 copies);
    ``ModelLoadError`` if there are none."""
    factors, scales, fifo = {}, {}, False
    for name, mod in hf.named_modules():
        if hasattr(mod, "lora_A") and "default" in getattr(mod, "lora_A", {}):
            a = mod.lora_A["default"].weight.detach().float().cpu().clone()
            b = mod.lora_B["default"].weight.detach().float().cpu().clone()
            factors[name], scales[name] = (a, b), float(mod.scaling["default"])
            fifo = bool(getattr(mod, "fan_in_fan_out", False))
    if not factors:
        raise ModelLoadError("the model holds no LoRA adapters; train with trainable='lora' first")
    return Delta(factors, scales, fifo, dict(meta or {}))


def save_delta(delta: Delta, path: str | os.PathLike) -> Path:
    """Write ``delta`` to ``path`` (a ``.safetensors`` file, or a directory: ``path/delta.safetensors``)."""
    from safetensors.torch import save_file

    path = Path(path)
    if path.suffix != ".safetensors":
        path.mkdir(parents=True, exist_ok=True)
        path = path / DELTA_FILE
    tensors = {}
    for name, (a, b) in delta.factors.items():
        tensors[f"{name}.lora_A"], tensors[f"{name}.lora_B"] = a.contiguous(), b.contiguous()
    header = {"format": FORMAT, "scales": json.dumps(delta.scales),
              "fan_in_fan_out": json.dumps(delta.fan_in_fan_out), "meta": json.dumps(delta.meta or {})}
    atomic_write(path, lambda tmp: save_file(tensors, str(tmp), metadata=header))
    return path


def read_delta(path: str | os.PathLike) -> Delta:
    """The ``Delta`` in ``path`` (a file or a directory holding ``delta.safetensors``); ``ModelLoadError``
    (one line) if it is missing, unreadable or not a delta."""
    from safetensors import safe_open

    path = Path(path)
    if path.is_dir():
        path = path / DELTA_FILE
    if not path.is_file():
        raise ModelLoadError(f"no delta file at {path}; reinstall circuit-distill or pass the path of a delta")
    try:
        with safe_open(str(path), framework="pt") as f:
            header = f.metadata() or {}
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except Exception as e:  # safetensors raises its own error type for damaged files
        raise ModelLoadError(f"could not read the delta {path} ({type(e).__name__}); copy it again") from None
    if header.get("format") != FORMAT:
        raise ModelLoadError(f"{path} is not a circuit-distill LoRA delta (format {header.get('format')!r})")
    scales = json.loads(header["scales"])
    factors = {n: (tensors[f"{n}.lora_A"], tensors[f"{n}.lora_B"]) for n in scales}
    return Delta(factors, scales, json.loads(header["fan_in_fan_out"]), json.loads(header.get("meta", "{}")))


@torch.no_grad()
def merge_delta(hf: nn.Module, delta: Delta) -> None:
    """Add ``delta`` into the weights of ``hf`` in place (in float32, then cast to the weight's dtype).
    ``ModelLoadError`` if a module is missing or its weight has another shape (a delta of another base)."""
    for name in delta.factors:
        try:
            w = hf.get_submodule(name).weight
        except AttributeError:
            raise ModelLoadError(f"the delta adapts {name}, which this model does not have: it was made for "
                                 f"another base model ({(delta.meta or {}).get('base', 'unknown')})") from None
        d = delta.weight_delta(name)
        if tuple(d.shape) != tuple(w.shape):
            raise ModelLoadError(f"the delta of {name} is {tuple(d.shape)} but the weight is {tuple(w.shape)}: it "
                                 f"was made for another base model ({(delta.meta or {}).get('base', 'unknown')})")
        w.copy_((w.float() + d.to(w.device)).to(w.dtype))


def unload_lora(hf: nn.Module) -> int:
    """Put every LoRA-adapted module of ``hf`` back to its base layer (the adapters are dropped, the base
    weights are as they were: LoRA trains only the adapters); returns how many modules were restored."""
    names = [n for n, m in hf.named_modules() if hasattr(m, "lora_A") and hasattr(m, "base_layer")]
    for name in names:
        parent, _, child = name.rpartition(".")
        owner = hf.get_submodule(parent) if parent else hf
        setattr(owner, child, getattr(owner, child).base_layer)
    return len(names)
