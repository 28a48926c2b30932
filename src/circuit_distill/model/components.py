"""Component addresses: attention heads, MLPs and residual-stream points.

Names are short and legible: ``L3.H5`` (head 5 of layer 3), ``L3.MLP``, ``L3.RESID_PRE`` (input
of block 3), ``L3.RESID_POST`` (output of block 3). Layers and heads count from zero.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from ..errors import ComponentError

KINDS = ("head", "mlp", "resid_pre", "resid_post")
_KIND_ORDER = {"resid_pre": 0, "head": 1, "mlp": 2, "resid_post": 3}
_PATTERN = re.compile(r"^L(\d+)\.(?:H(\d+)|(MLP|RESID_PRE|RESID_POST))$")


@dataclass(frozen=True)
class Component:
    """One addressable component of a transformer.

    ``kind`` is one of ``head``, ``mlp``, ``resid_pre``, ``resid_post``; ``head`` is set only
    for heads. Components sort in forward order (layer, then residual-in, heads, MLP, out).
    """

    layer: int
    kind: str
    head: int | None = None

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ComponentError(f"unknown component kind {self.kind!r}; expected one of {KINDS}")
        if self.layer < 0:
            raise ComponentError(f"layer must be >= 0, got {self.layer}")
        if (self.kind == "head") != (self.head is not None):
            raise ComponentError("a head needs a head index, and only heads have one")
        if self.head is not None and self.head < 0:
            raise ComponentError(f"head must be >= 0, got {self.head}")

    @classmethod
    def parse(cls, text: str | Component) -> Component:
        """Parse ``L3.H5``, ``L3.MLP``, ``L3.RESID_PRE`` or ``L3.RESID_POST`` (case-insensitive)."""
        if isinstance(text, Component):
            return text
        m = _PATTERN.match(str(text).strip().upper())
        if m is None:
            raise ComponentError(
                f"cannot parse component {text!r}: use L<layer>.H<head>, L<layer>.MLP, "
                "L<layer>.RESID_PRE or L<layer>.RESID_POST (e.g. 'L3.H5')"
            )
        layer = int(m.group(1))
        if m.group(2) is not None:
            return cls(layer, "head", int(m.group(2)))
        return cls(layer, m.group(3).lower())

    @classmethod
    def make_head(cls, layer: int, head: int) -> Component:
        return cls(layer, "head", head)

    @classmethod
    def make_mlp(cls, layer: int) -> Component:
        return cls(layer, "mlp")

    @property
    def is_head(self) -> bool:
        return self.kind == "head"

    def sort_key(self) -> tuple[int, int, int]:
        return (self.layer, _KIND_ORDER[self.kind], -1 if self.head is None else self.head)

    def __lt__(self, other: Component) -> bool:
        return self.sort_key() < other.sort_key()

    def __str__(self) -> str:
        if self.kind == "head":
            return f"L{self.layer}.H{self.head}"
        return f"L{self.layer}.{self.kind.upper()}"

    def __repr__(self) -> str:
        return f"Component({str(self)!r})"


def parse_components(items) -> list[Component]:
    """Parse an iterable of names or components (a comma-separated string also works)."""
    if isinstance(items, (str, Component)):
        items = [s for s in str(items).split(",") if s.strip()] if isinstance(items, str) else [items]
    return [Component.parse(c) for c in items]
