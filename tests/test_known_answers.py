"""Known-answer tests: a hand-built induction circuit must be found; noise must not be.
Plus the seed notebook's published GPT-2 Small numbers, where the real weights are available."""

from __future__ import annotations

import numpy as np
import pytest

from core import activation_patching, direct_logit_attribution, induction_scores, logit_lens, predict
from tests.conftest import EIFFEL, IOI_CLEAN, IOI_CORRUPTED


def test_hand_built_induction_head_is_found(induction_circuit):
    result = induction_scores(induction_circuit, seq_len=20, batch=16, seed=0)
    assert [(h["layer"], h["head"]) for h in result.induction_heads] == [(1, 0)]
    assert result.scores[1, 0] > 0.7
    assert result.prev_token_scores[0, 0] > 0.95  # its partner, the previous-token head
    assert result.scores[0].max() < 0.05  # layer 0 cannot do induction
    first_half, second_half = result.loss_by_position[:20].mean(), result.loss_by_position[20:].mean()
    assert second_half < first_half / 3


def test_random_model_has_no_induction_head(tiny_model, gpt2_shaped):
    for model in (tiny_model, gpt2_shaped):
        result = induction_scores(model, seq_len=20, batch=4, seed=0)
        assert result.induction_heads == []
        assert result.scores.max() < 0.2


# --- real GPT-2 Small: the seed notebook's published numbers -------------------------------


@pytest.mark.gpt2
def test_gpt2_eiffel_tower_prefers_london(gpt2):
    result = predict(gpt2, EIFFEL, k=2)
    assert result.top_tokens == [" London", " Paris"]
    np.testing.assert_allclose(result.top_probs, [0.0691, 0.0688], atol=5e-5)
    lens = logit_lens(gpt2, EIFFEL, target=" Paris")
    assert lens.target_probs[-1, -1] == pytest.approx(0.0688, abs=5e-5)


@pytest.mark.gpt2
def test_gpt2_induction_heads(gpt2):
    result = induction_scores(gpt2, seq_len=50, batch=10, seed=0)
    found = {(h["layer"], h["head"]) for h in result.induction_heads}
    assert {(5, 1), (5, 5), (6, 9), (7, 2), (7, 10)} <= found


@pytest.mark.gpt2
def test_gpt2_ioi_logit_differences(gpt2):
    result = activation_patching(gpt2, IOI_CLEAN, IOI_CORRUPTED, " Mary", " John")
    assert result.clean_value == pytest.approx(3.481, abs=5e-3)
    assert result.corrupted_value == pytest.approx(-4.372, abs=5e-3)


@pytest.mark.gpt2
def test_gpt2_unscaled_head_dla_matches_the_seed(gpt2):
    """The seed projected raw head outputs on W_U[:, ' Mary'] (IO logit alone, no LayerNorm scale)."""
    result = direct_logit_attribution(gpt2, IOI_CLEAN, " Mary", scale_by_ln=False)
    assert result.heads[9, 9] == pytest.approx(54.36, abs=0.05)
    assert result.heads[10, 7] == pytest.approx(-45.97, abs=0.05)
