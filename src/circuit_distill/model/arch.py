"""Architecture specs: where each family keeps its blocks, attention and MLPs, and which
parameter slices belong to one attention head.

One ``FamilySpec`` per family is all it takes to support a new model: see ``FAMILIES`` and
``register_family``. Every spec is validated when a model loads (``self_check``): per-head
contributions through the output projection must add up to the attention output.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

from ..errors import ComponentError, SelfCheckError, UnsupportedModelError
from .components import Component


@dataclass(frozen=True)
class FamilySpec:
    """Where one model family keeps its parts, as dotted paths.

    ``layers`` candidates are tried from the loaded (task-head) model; the other paths are
    relative to one block. ``qkv`` says how query/key/value weights are laid out:
    ``separate`` (``q_proj``/``k_proj``/``v_proj`` Linear, Llama-like), ``gpt2`` (one Conv1D
    ``c_attn`` with q|k|v along the output dim, weight stored [in, out]), ``fused`` (one Linear whose
    output is q | k | v: ``n_heads`` query heads then ``n_kv_heads`` key and value groups, Phi-3's
    ``qkv_proj``) or ``neox`` (one Linear whose output is laid out [head, (q, k, v), d_head]). ``o_conv1d`` marks a Conv1D output
    projection (weight [in, out]).
    """

    name: str
    model_types: tuple[str, ...]
    layers: tuple[str, ...]
    attn: str
    o_proj: str
    mlp: str
    qkv: str = "separate"
    q_proj: str = "self_attn.q_proj"
    k_proj: str = "self_attn.k_proj"
    v_proj: str = "self_attn.v_proj"
    o_conv1d: bool = False
    causal: bool = True
    n_heads_attr: tuple[str, ...] = ("num_attention_heads", "n_head")
    n_layers_attr: tuple[str, ...] = ("num_hidden_layers", "n_layer")
    d_model_attr: tuple[str, ...] = ("hidden_size", "n_embd", "dim")


FAMILIES: dict[str, FamilySpec] = {}


def register_family(spec: FamilySpec) -> FamilySpec:
    """Add (or replace) a family spec; its ``model_types`` are matched against ``config.model_type``."""
    FAMILIES[spec.name] = spec
    return spec


_LLAMA_LIKE = dict(layers=("model.layers", "layers"), attn="self_attn", o_proj="self_attn.o_proj", mlp="mlp")
register_family(FamilySpec("llama", ("llama",), **_LLAMA_LIKE))
register_family(FamilySpec("mistral", ("mistral",), **_LLAMA_LIKE))
register_family(FamilySpec("qwen2", ("qwen2",), **_LLAMA_LIKE))
register_family(FamilySpec("qwen3", ("qwen3",), **_LLAMA_LIKE))
# Gemma, Gemma 2 and Gemma 3 (text) keep Llama's paths; Gemma 2/3 add norms after attention and MLP
# (outside the output projection) and Gemma 3 norms queries and keys per head, which leaves heads apart.
register_family(FamilySpec("gemma", ("gemma",), **_LLAMA_LIKE))
register_family(FamilySpec("gemma2", ("gemma2",), **_LLAMA_LIKE))
register_family(FamilySpec("gemma3_text", ("gemma3_text",), **_LLAMA_LIKE))
# OLMo 2 norms all queries together and all keys together (q_norm/k_norm over n_heads*d_head), so a
# head's q or k slice moves every head; head outputs still add up through o_proj.
register_family(FamilySpec("olmo2", ("olmo2",), **_LLAMA_LIKE))
register_family(
    FamilySpec("phi3", ("phi3",), **_LLAMA_LIKE, qkv="fused", q_proj="self_attn.qkv_proj",
               k_proj="self_attn.qkv_proj", v_proj="self_attn.qkv_proj")
)
register_family(
    FamilySpec("gpt2", ("gpt2",), layers=("transformer.h", "h"), attn="attn", o_proj="attn.c_proj",
               mlp="mlp", qkv="gpt2", q_proj="attn.c_attn", k_proj="attn.c_attn", v_proj="attn.c_attn",
               o_conv1d=True)
)
register_family(
    FamilySpec("gpt_neox", ("gpt_neox",), layers=("gpt_neox.layers", "layers"), attn="attention",
               o_proj="attention.dense", mlp="mlp", qkv="neox", q_proj="attention.query_key_value",
               k_proj="attention.query_key_value", v_proj="attention.query_key_value")
)
register_family(
    FamilySpec("bert", ("bert",), layers=("bert.encoder.layer", "encoder.layer"), attn="attention.self",
               o_proj="attention.output.dense", mlp="output.dense", q_proj="attention.self.query",
               k_proj="attention.self.key", v_proj="attention.self.value", causal=False)
)
register_family(
    FamilySpec("distilbert", ("distilbert",), layers=("distilbert.transformer.layer", "transformer.layer"),
               attn="attention", o_proj="attention.out_lin", mlp="ffn", q_proj="attention.q_lin",
               k_proj="attention.k_lin", v_proj="attention.v_lin", causal=False,
               n_heads_attr=("n_heads",), n_layers_attr=("n_layers",), d_model_attr=("dim",))
)


def family_for(model_type: str) -> FamilySpec:
    for spec in FAMILIES.values():
        if model_type in spec.model_types:
            return spec
    supported = ", ".join(f"{s.name} ({'/'.join(s.model_types)})" for s in FAMILIES.values())
    raise UnsupportedModelError(
        f"model family {model_type!r} is not supported. Supported families: {supported}. "
        "To add one, describe where its blocks, attention output projection and MLP live with "
        "circuit_distill.model.arch.register_family(FamilySpec(...)); the load-time self-check "
        "tells you whether the spec is right."
    )


@dataclass(frozen=True)
class ParamSlice:
    """A contiguous slice ``[start, stop)`` of parameter ``name`` along dimension ``dim``."""

    name: str
    dim: int
    start: int
    stop: int

    def of(self, model: nn.Module) -> torch.Tensor:
        return model.get_parameter(self.name).narrow(self.dim, self.start, self.stop - self.start)

    @property
    def numel_along(self) -> int:
        return self.stop - self.start


@dataclass(frozen=True)
class HeadSlices:
    """The parameters of one attention head.

    ``q``: query weight rows (and bias entries); ``o``: output-projection columns (in the
    ``y = W x`` sense, whatever the storage layout); ``k``/``v``: the key/value rows of the head's
    KV group, which grouped-query attention shares between ``n_heads / n_kv_heads`` query heads.
    """

    layer: int
    head: int
    kv_group: int
    q: tuple[ParamSlice, ...]
    o: tuple[ParamSlice, ...]
    k: tuple[ParamSlice, ...]
    v: tuple[ParamSlice, ...]

    def slices(self, include_kv: bool = False) -> tuple[ParamSlice, ...]:
        return self.q + self.o + ((self.k + self.v) if include_kv else ())


@dataclass
class Arch:
    """The spec of one loaded model: its family, sizes and module paths."""

    family: FamilySpec
    n_layers: int
    n_heads: int
    n_kv_heads: int
    d_head: int
    d_model: int
    layers_path: str
    _param_names: frozenset = field(default_factory=frozenset, repr=False)

    @property
    def heads_per_kv_group(self) -> int:
        return self.n_heads // self.n_kv_heads

    # ---- modules -------------------------------------------------------------------------
    def layer_name(self, layer: int) -> str:
        self._check_layer(layer)
        return f"{self.layers_path}.{layer}" if self.layers_path else str(layer)

    def module_name(self, layer: int, part: str) -> str:
        """Dotted name of ``part`` (``attn``, ``o_proj``, ``mlp`` or a raw relative path) of a block."""
        rel = getattr(self.family, part, part) if part in ("attn", "o_proj", "mlp") else part
        return f"{self.layer_name(layer)}.{rel}"

    def layer(self, model: nn.Module, layer: int) -> nn.Module:
        return model.get_submodule(self.layer_name(layer))

    def o_proj(self, model: nn.Module, layer: int) -> nn.Module:
        return model.get_submodule(self.module_name(layer, "o_proj"))

    def mlp(self, model: nn.Module, layer: int) -> nn.Module:
        return model.get_submodule(self.module_name(layer, "mlp"))

    def attn(self, model: nn.Module, layer: int) -> nn.Module:
        return model.get_submodule(self.module_name(layer, "attn"))

    # ---- validation ----------------------------------------------------------------------
    def _check_layer(self, layer: int) -> None:
        if not 0 <= layer < self.n_layers:
            raise ComponentError(f"layer {layer} out of range: the model has {self.n_layers} layers (0..{self.n_layers - 1})")

    def check_component(self, comp: Component) -> Component:
        self._check_layer(comp.layer)
        if comp.is_head and not 0 <= comp.head < self.n_heads:
            raise ComponentError(
                f"head {comp} out of range: layer {comp.layer} has {self.n_heads} heads (0..{self.n_heads - 1})"
            )
        return comp

    def components(self, kind: str = "head") -> list[Component]:
        """All components of ``kind`` (``head``, ``mlp``, ``resid_pre``, ``resid_post`` or ``all``) in forward order."""
        kinds = ("head", "mlp", "resid_pre", "resid_post") if kind == "all" else (kind,)
        out: list[Component] = []
        for layer in range(self.n_layers):
            for k in kinds:
                if k == "head":
                    out += [Component(layer, "head", h) for h in range(self.n_heads)]
                elif k in ("mlp", "resid_pre", "resid_post"):
                    out.append(Component(layer, k))
                else:
                    raise ComponentError(f"unknown component kind {k!r}; use head, mlp, resid_pre, resid_post or all")
        return sorted(out)

    # ---- per-head parameters -------------------------------------------------------------
    def kv_group(self, head: int) -> int:
        """The key/value group of query head ``head`` (grouped-query attention)."""
        return head // self.heads_per_kv_group

    def head_slices(self, layer: int, head: int) -> HeadSlices:
        """Parameter slices that belong to head ``head`` of ``layer`` (see ``HeadSlices``)."""
        self.check_component(Component(layer, "head", head))
        f, dh, g = self.family, self.d_head, self.kv_group(head)
        base = self.layer_name(layer)

        def sl(rel: str, kind: str, dim: int, start: int, stop: int) -> tuple[ParamSlice, ...]:
            out = []
            for suffix in ("weight", "bias"):
                name = f"{base}.{rel}.{suffix}"
                if name in self._param_names:
                    # biases are 1-D: they follow the weight's output dimension only
                    if suffix == "bias":
                        if kind == "o":
                            continue  # the output bias is shared by all heads
                        out.append(ParamSlice(name, 0, start, stop))
                    else:
                        out.append(ParamSlice(name, dim, start, stop))
            return tuple(out)

        if f.qkv == "separate":
            q = sl(f.q_proj, "q", 0, head * dh, (head + 1) * dh)
            k = sl(f.k_proj, "k", 0, g * dh, (g + 1) * dh)
            v = sl(f.v_proj, "v", 0, g * dh, (g + 1) * dh)
        elif f.qkv in ("gpt2", "fused"):  # output = q | k | v (gpt2: Conv1D, weight [in, out])
            dim = 1 if f.qkv == "gpt2" else 0
            k0 = self.n_heads * dh
            v0 = k0 + self.n_kv_heads * dh
            q = sl(f.q_proj, "q", dim, head * dh, (head + 1) * dh)
            k = sl(f.k_proj, "k", dim, k0 + g * dh, k0 + (g + 1) * dh)
            v = sl(f.v_proj, "v", dim, v0 + g * dh, v0 + (g + 1) * dh)
        elif f.qkv == "neox":  # Linear: output laid out [head, (q, k, v), d_head]
            s = head * 3 * dh
            q = sl(f.q_proj, "q", 0, s, s + dh)
            k = sl(f.k_proj, "k", 0, s + dh, s + 2 * dh)
            v = sl(f.v_proj, "v", 0, s + 2 * dh, s + 3 * dh)
        else:  # pragma: no cover - guarded by FamilySpec authors
            raise UnsupportedModelError(f"unknown qkv layout {f.qkv!r} in family {f.name}")
        o = sl(f.o_proj, "o", 0 if f.o_conv1d else 1, head * dh, (head + 1) * dh)
        return HeadSlices(layer, head, g, q, o, k, v)

    def head_param_count(self, include_kv: bool = False) -> int:
        """Parameters in one head's slices (``include_kv``: plus its whole KV group)."""
        return 0 if self.n_layers == 0 else sum(
            s.numel_along * (self._other_dims(s)) for s in self.head_slices(0, 0).slices(include_kv)
        )

    def _other_dims(self, s: ParamSlice) -> int:
        return self._shapes[s.name].numel() // self._shapes[s.name][s.dim]

    _shapes: dict = field(default_factory=dict, repr=False)


def _first_attr(config, names: tuple[str, ...]):
    for n in names:
        v = getattr(config, n, None)
        if v is not None:
            return v
    return None


def build_arch(model: nn.Module) -> Arch:
    """Derive the ``Arch`` of a loaded Hugging Face model from its config and module tree."""
    config = model.config
    spec = family_for(getattr(config, "model_type", type(model).__name__))
    layers_path = None
    for cand in spec.layers:
        try:
            sub = model.get_submodule(cand)
        except AttributeError:
            continue
        if isinstance(sub, nn.ModuleList):
            layers_path = cand
            break
    if layers_path is None:
        raise SelfCheckError(
            f"family {spec.name}: found none of the block lists {spec.layers} in {type(model).__name__}; "
            "the FamilySpec's `layers` paths do not match this model class"
        )
    n_heads = _first_attr(config, spec.n_heads_attr)
    n_layers = _first_attr(config, spec.n_layers_attr)
    d_model = _first_attr(config, spec.d_model_attr)
    n_kv = getattr(config, "num_key_value_heads", None) or n_heads
    d_head = getattr(config, "head_dim", None) or d_model // n_heads
    if n_heads % n_kv:
        raise SelfCheckError(f"family {spec.name}: {n_heads} heads are not divisible into {n_kv} KV groups")
    params = dict(model.named_parameters())
    arch = Arch(spec, int(n_layers), int(n_heads), int(n_kv), int(d_head), int(d_model), layers_path,
                frozenset(params), {k: v.shape for k, v in params.items()})
    return arch
