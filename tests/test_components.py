import pytest
from hypothesis import given
from hypothesis import strategies as st

from circuit_distill import Component, load_model, parse_components
from circuit_distill.errors import ComponentError


@given(layer=st.integers(0, 200), head=st.integers(0, 200), kind=st.sampled_from(["head", "mlp", "resid_pre", "resid_post"]))
def test_parse_str_round_trip(layer, head, kind):
    c = Component(layer, kind, head if kind == "head" else None)
    assert Component.parse(str(c)) == c
    assert Component.parse(str(c).lower()) == c


def test_names():
    assert str(Component.make_head(3, 5)) == "L3.H5"
    assert str(Component.make_mlp(3)) == "L3.MLP"
    assert Component.parse("L3.RESID_PRE") == Component(3, "resid_pre")
    assert parse_components("L0.H1, L1.MLP") == [Component(0, "head", 1), Component(1, "mlp")]


@pytest.mark.parametrize("bad", ["L3", "H5", "L3.H", "3.5", "L-1.H2", "L1.ATTN", ""])
def test_parse_errors(bad):
    with pytest.raises(ComponentError, match="cannot parse"):
        Component.parse(bad)


def test_forward_order():
    comps = [Component.parse(s) for s in ["L1.MLP", "L0.H3", "L1.RESID_PRE", "L0.MLP", "L0.H0", "L1.H0"]]
    assert [str(c) for c in sorted(comps)] == ["L0.H0", "L0.H3", "L0.MLP", "L1.RESID_PRE", "L1.H0", "L1.MLP"]


def test_enumeration_and_range_errors(tiny_dirs):
    m = load_model(tiny_dirs["llama"])
    heads = m.components("head")
    assert len(heads) == 2 * 4 and heads[0] == Component(0, "head", 0) and heads[-1] == Component(1, "head", 3)
    assert [str(c) for c in m.components("mlp")] == ["L0.MLP", "L1.MLP"]
    assert len(m.components("all")) == 2 * (4 + 3)
    with pytest.raises(ComponentError, match="layer 2 out of range"):
        m.arch.check_component(Component.parse("L2.H0"))
    with pytest.raises(ComponentError, match="head L1.H4 out of range"):
        m.arch.check_component(Component.parse("L1.H4"))
    with pytest.raises(ComponentError, match="unknown component kind"):
        m.components("attn")
