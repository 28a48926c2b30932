"""Choose which student parameters train: matched heads' slices, attention, everything, or LoRA.

``matched_heads`` trains only the query rows and output-projection columns of the given student
heads (``Arch.head_slices``); ``train_kv=True`` adds the key/value rows of their (GQA-shared) KV
groups. A parameter that owns any such slice gets ``requires_grad=True`` and a gradient hook
that zeroes every entry outside the slices. Zero gradients alone do not freeze entries under
AdamW: decoupled weight decay still shrinks them. So ``TrainableInfo.restore_frozen()`` copies the
frozen entries back from a snapshot; call it after every ``optimizer.step()``, or once
``info.attach(optimizer)`` to run it automatically as an optimizer step post-hook. With both, every
weight outside the slices stays bit-for-bit unchanged (Adam's update of an entry whose gradient
was always zero is exactly zero). Fully frozen parameters get ``requires_grad=False`` and no
gradient, which every torch optimizer skips.

Limits: the masks address the original (unflattened) parameters, so use them on one device or under
DDP (``accelerate`` multi-GPU), not with FSDP/DeepSpeed ZeRO-3 flat parameters (use ``attention``,
``all`` or ``lora`` there). Moving the model (``.to(device)``) after ``set_trainable`` is fine;
changing its dtype afterwards loses the bit-exact guarantee (the snapshot is cast).

Counts are exact: ``count`` is the number of scalar parameters that can change (overlapping slices
counted once), ``total`` every parameter of the model (LoRA: including the adapters).
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field

import torch
from torch import nn

from ..errors import ConfigError
from ..model.components import Component

SUBSETS = ("matched_heads", "attention", "all", "lora")
_ATTR = "_circuit_distill_trainable"  # the model's current TrainableInfo (replaced by the next call)


def _unwrap(model) -> tuple[nn.Module, object]:
    if hasattr(model, "hf") and hasattr(model, "arch"):
        return model.hf, model.arch
    raise ConfigError("set_trainable expects a circuit_distill Model (from load_model), got " + type(model).__name__)


@dataclass
class TrainableInfo:
    """What ``set_trainable`` did.

    ``masks``: parameter name -> bool mask of trainable entries, or None when the whole parameter
    trains. ``count``/``total``/``fraction``: trainable scalars, all scalars, their ratio;
    ``attention_total``: scalars in the attention modules (for "x% of attention parameters").
    """

    subset: str
    count: int
    total: int
    attention_total: int
    masks: dict[str, torch.Tensor | None]
    heads: list[Component] = field(default_factory=list)
    train_kv: bool = False
    _params: dict[str, nn.Parameter] = field(default_factory=dict, repr=False)
    _frozen_snapshot: dict[str, torch.Tensor] = field(default_factory=dict, repr=False)
    _handles: list = field(default_factory=list, repr=False)

    @property
    def fraction(self) -> float:
        return self.count / self.total if self.total else 0.0

    @property
    def attention_fraction(self) -> float:
        return self.count / self.attention_total if self.attention_total else 0.0

    def parameters(self) -> list[nn.Parameter]:
        """The parameters to give the optimizer (those with any trainable entry)."""
        return list(self._params.values())

    def named_parameters(self) -> list[tuple[str, nn.Parameter]]:
        return list(self._params.items())

    @torch.no_grad()
    def restore_frozen(self) -> None:
        """Copy the frozen entries of partly-trainable parameters back (undoes weight decay on them)."""
        for name, snap in self._frozen_snapshot.items():
            p, mask = self._params[name], self.masks[name]
            if mask.device != p.device or snap.device != p.device or snap.dtype != p.dtype:
                mask = self.masks[name] = mask.to(p.device)
                snap = self._frozen_snapshot[name] = snap.to(device=p.device, dtype=p.dtype)
            p.copy_(torch.where(mask, p, snap))

    def attach(self, optimizer: torch.optim.Optimizer):
        """Run ``restore_frozen`` after every ``optimizer.step()``; returns the hook handle."""
        h = optimizer.register_step_post_hook(lambda opt, args, kwargs: self.restore_frozen())
        self._handles.append(h)
        return h

    @torch.no_grad()
    def max_frozen_change(self) -> float:
        """Largest absolute change of any frozen entry of a partly-trainable parameter since set_trainable."""
        worst = 0.0
        for name, snap in self._frozen_snapshot.items():
            p, mask = self._params[name], self.masks[name].to(self._params[name].device)
            diff = (p.detach() - snap.to(p.device, p.dtype)).abs()[~mask]
            if diff.numel():
                worst = max(worst, float(diff.max()))
        return worst

    def remove(self) -> None:
        """Remove the gradient masks and optimizer hooks (requires_grad flags stay as they are)."""
        for h in self._handles:
            h.remove()
        self._handles.clear()

    def to_dict(self) -> dict:
        return {
            "subset": self.subset, "trainable_params": self.count, "total_params": self.total,
            "fraction": self.fraction, "attention_params": self.attention_total,
            "attention_fraction": self.attention_fraction, "heads": [str(h) for h in self.heads],
            "train_kv": self.train_kv,
        }

    def __str__(self) -> str:
        return (f"{self.subset}: {self.count:,} of {self.total:,} parameters trainable ({100 * self.fraction:.2f}%; "
                f"{100 * self.attention_fraction:.2f}% of attention)")


def _attention_params(hf: nn.Module, arch) -> dict[str, nn.Parameter]:
    out: dict[str, nn.Parameter] = {}
    for layer in range(arch.n_layers):
        prefix = arch.module_name(layer, "attn")
        for n, p in arch.attn(hf, layer).named_parameters():
            out[f"{prefix}.{n}"] = p
    return out


def _mask_hook(info: TrainableInfo, name: str):
    def hook(g: torch.Tensor) -> torch.Tensor:
        m = info.masks[name]
        if m.device != g.device:  # the model moved after set_trainable: move the mask once
            m = info.masks[name] = m.to(g.device)
        return torch.where(m, g, torch.zeros((), dtype=g.dtype, device=g.device))
    return hook


def set_trainable(model, subset: str = "matched_heads", heads: Iterable[Component | str] | None = None,
                  train_kv: bool = False, *, lora_r: int = 8, lora_alpha: int = 16,
                  lora_dropout: float = 0.0, lora_targets: list[str] | None = None) -> TrainableInfo:
    """Freeze ``model`` (a ``Model``) except ``subset`` and return exact counts and masks.

    - ``matched_heads``: query rows and output-projection columns of ``heads`` (student heads,
      e.g. ``cmap.student_components``); ``train_kv`` adds the key/value rows of their KV groups.
    - ``attention``: every parameter of every attention module.
    - ``all``: every parameter.
    - ``lora``: LoRA adapters (peft) injected in place into the query and output projections of
      the layers of ``heads`` (all layers if None), or into ``lora_targets`` (module names); the
      base weights freeze. Module paths stay the same, so capture hooks keep working, but the
      projections' parameter names gain ``.base_layer``.

    Call ``info.restore_frozen()`` after each optimizer step (or ``info.attach(optimizer)``) for
    ``matched_heads``; see the module docstring. Calling ``set_trainable`` again on the same model
    replaces the previous choice (its gradient masks and optimizer hooks are removed).
    """
    hf, arch = _unwrap(model)
    prev = getattr(hf, _ATTR, None)
    if prev is not None:  # a second call replaces the first: its gradient masks must not linger
        prev.remove()
    info = _set_trainable(hf, arch, model, subset, heads, train_kv, lora_r=lora_r, lora_alpha=lora_alpha,
                          lora_dropout=lora_dropout, lora_targets=lora_targets)
    object.__setattr__(hf, _ATTR, info)
    return info


def _set_trainable(hf, arch, model, subset, heads, train_kv, *, lora_r, lora_alpha, lora_dropout,
                   lora_targets) -> TrainableInfo:
    if subset not in SUBSETS:
        raise ConfigError(f"unknown trainable subset {subset!r}; choose one of {', '.join(SUBSETS)}")
    head_list = sorted({Component.parse(h) for h in heads}) if heads is not None else []
    for h in head_list:
        if not h.is_head:
            raise ConfigError(f"trainable heads must be attention heads, got {h}")
        arch.check_component(h)

    if subset == "lora":
        return _set_lora(model, hf, arch, head_list, r=lora_r, alpha=lora_alpha, dropout=lora_dropout,
                         targets=lora_targets)

    params = dict(hf.named_parameters())
    total = sum(p.numel() for p in params.values())
    attn_total = sum(p.numel() for p in _attention_params(hf, arch).values())
    for p in params.values():
        p.requires_grad_(False)

    masks: dict[str, torch.Tensor | None] = {}
    chosen: dict[str, nn.Parameter] = {}
    if subset == "all":
        chosen = params
        masks = dict.fromkeys(params)
    elif subset == "attention":
        chosen = _attention_params(hf, arch)
        masks = dict.fromkeys(chosen)
    else:  # matched_heads
        if not head_list:
            raise ConfigError("subset 'matched_heads' needs the student heads to train (heads=[...]), e.g. "
                              "the student side of the component map")
        for h in head_list:
            for s in arch.head_slices(h.layer, h.head).slices(include_kv=train_kv):
                if s.name not in params:
                    raise ConfigError(f"parameter {s.name} of head {h} is not in the model (were LoRA adapters "
                                      "injected into it?); reload the model before choosing head slices")
                p = params[s.name]
                if s.name not in masks:
                    masks[s.name] = torch.zeros(p.shape, dtype=torch.bool, device=p.device)
                    chosen[s.name] = p
                masks[s.name].narrow(s.dim, s.start, s.stop - s.start).fill_(True)
        for name, m in list(masks.items()):
            if bool(m.all()):
                masks[name] = None  # the slices cover the whole parameter (e.g. a q bias of one head)

    info = TrainableInfo(subset, 0, total, attn_total, masks, head_list, train_kv, chosen)
    count = 0
    for name, p in chosen.items():
        p.requires_grad_(True)
        m = masks[name]
        if m is None:
            count += p.numel()
        else:
            count += int(m.sum())
            info._handles.append(p.register_hook(_mask_hook(info, name)))
            info._frozen_snapshot[name] = p.detach().clone()
    info.count = count
    return info


def _set_lora(model, hf: nn.Module, arch, heads: list[Component], *, r: int, alpha: int, dropout: float,
              targets: list[str] | None) -> TrainableInfo:
    try:
        from peft import LoraConfig, inject_adapter_in_model
    except ImportError as e:
        raise ConfigError("subset 'lora' needs peft: pip install 'circuit-distill[peft]'") from e
    attn_total = sum(p.numel() for p in _attention_params(hf, arch).values())
    if targets is None:
        layers = sorted({h.layer for h in heads}) if heads else range(arch.n_layers)
        f = arch.family
        targets = []
        for layer in layers:
            targets.append(arch.module_name(layer, f.q_proj))
            targets.append(arch.module_name(layer, "o_proj"))
        targets = sorted(set(targets))
    for p in hf.parameters():
        p.requires_grad_(False)
    cfg = LoraConfig(r=r, lora_alpha=alpha, lora_dropout=dropout, target_modules=targets,
                     fan_in_fan_out=bool(arch.family.o_conv1d))
    inject_adapter_in_model(cfg, hf)
    params = dict(hf.named_parameters())
    chosen = {n: p for n, p in params.items() if "lora_" in n}
    if not chosen:
        raise ConfigError(f"LoRA matched no module among {targets}; pass lora_targets=[module names]")
    for n, p in params.items():
        p.requires_grad_(n in chosen)
    total = sum(p.numel() for p in params.values())
    count = sum(p.numel() for p in chosen.values())
    return TrainableInfo("lora", count, total, attn_total, dict.fromkeys(chosen), heads, False, chosen)
