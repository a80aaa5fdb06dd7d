"""Each technique on a tiny random model: shapes, labels, JSON, identities, bad arguments."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

import core.model
from core import (
    LIMITS,
    activation_patching,
    attention_patterns,
    direct_logit_attribution,
    induction_scores,
    logit_lens,
    predict,
)
from core.model import to_tokens
from tests.conftest import IOI_CLEAN as PROMPT


def test_predict_top_k_matches_the_models_softmax(tiny_model):
    result = predict(tiny_model, PROMPT, k=5)
    with torch.no_grad():
        probs = torch.softmax(tiny_model(to_tokens(tiny_model, PROMPT))[0, -1].double(), -1)
    expected = probs.topk(5)
    np.testing.assert_allclose(result.top_probs, expected.values.cpu().numpy(), atol=1e-7)
    assert result.top_tokens == [tiny_model.tokenizer.decode([int(i)]) for i in expected.indices]
    assert list(result.to_dict()) == ["tokens", "top_tokens", "top_probs"]


@pytest.mark.parametrize("k", [0, -1, 101, 2.5, "3", None, True])
def test_predict_rejects_bad_k(tiny_model, k):
    with pytest.raises(ValueError, match="k must be"):
        predict(tiny_model, PROMPT, k=k)


def test_logit_lens_shapes_labels_and_json(tiny_model):
    result = logit_lens(tiny_model, PROMPT, target=" Mary")
    n_pos = len(result.tokens)
    assert result.layers == ["0_pre", "1_pre", "final_post"]
    assert result.top_probs.shape == result.target_probs.shape == result.target_ranks.shape == (3, n_pos)
    assert len(result.top_tokens) == 3 and all(len(row) == n_pos for row in result.top_tokens)
    data = json.loads(json.dumps(result.to_dict()))
    assert set(data) == {"tokens", "layers", "top_tokens", "top_probs", "target", "target_probs", "target_ranks"}
    assert isinstance(data["target_ranks"][0][0], int) and isinstance(data["top_probs"][0][0], float)


def test_logit_lens_without_target_has_nulls(tiny_model):
    data = logit_lens(tiny_model, PROMPT).to_dict()
    assert data["target"] is None and data["target_probs"] is None and data["target_ranks"] is None


def test_logit_lens_rank_zero_exactly_where_target_is_top1(tiny_model):
    result = logit_lens(tiny_model, PROMPT, target=" Mary")
    is_top = np.array([[token == " Mary" for token in row] for row in result.top_tokens])
    assert ((result.target_ranks == 0) == is_top).all()
    assert (result.target_probs <= result.top_probs + 1e-12).all()


def test_dla_parts_sum_to_the_logit_difference(tiny_model):
    result = direct_logit_attribution(tiny_model, PROMPT, " Mary", " John")
    assert result.heads.shape == (2, 4) and result.mlps.shape == (2,)
    assert result.total == pytest.approx(result.value, abs=1e-4)
    data = result.to_dict()
    assert list(data) == ["tokens", "target", "competing", "value", "heads", "mlps", "embed", "pos_embed", "bias", "total"]


def test_dla_of_single_logit_sums_to_that_logit(tiny_model):
    result = direct_logit_attribution(tiny_model, PROMPT, " Mary")
    with torch.no_grad():
        logit = tiny_model(to_tokens(tiny_model, PROMPT))[0, -1, 5335]
    assert result.value == pytest.approx(float(logit), abs=1e-5)
    assert result.total == pytest.approx(result.value, abs=1e-4)


def test_dla_rejects_same_target_and_competing(tiny_model):
    with pytest.raises(ValueError, match="same"):
        direct_logit_attribution(tiny_model, PROMPT, " Mary", " Mary")


def test_attention_rows_are_distributions_and_causal(tiny_model):
    result = attention_patterns(tiny_model, PROMPT, layer=1)
    n_pos = len(result.tokens)
    assert result.patterns.shape == (4, n_pos, n_pos)
    np.testing.assert_allclose(result.patterns.sum(-1), 1.0, atol=1e-5)
    assert np.allclose(np.triu(result.patterns, k=1), 0.0)


@pytest.mark.parametrize("layer", [-1, 2, 1.5, "0", None])
def test_attention_rejects_bad_layer(tiny_model, layer):
    with pytest.raises(ValueError, match="layer must be"):
        attention_patterns(tiny_model, PROMPT, layer=layer)


def test_induction_is_reproducible_by_seed(tiny_model):
    a = induction_scores(tiny_model, seq_len=8, batch=3, seed=7)
    b = induction_scores(tiny_model, seq_len=8, batch=3, seed=7)
    c = induction_scores(tiny_model, seq_len=8, batch=3, seed=8)
    np.testing.assert_array_equal(a.scores, b.scores)
    assert not np.array_equal(a.scores, c.scores)
    assert a.scores.shape == a.prev_token_scores.shape == a.duplicate_token_scores.shape == (2, 4)
    assert a.loss_by_position.shape == (16,)
    data = a.to_dict()
    assert list(data) == [
        "scores", "prev_token_scores", "duplicate_token_scores", "loss_by_position", "threshold", "induction_heads",
    ]


def test_induction_chunking_does_not_change_scores(tiny_model):
    whole = induction_scores(tiny_model, seq_len=8, batch=4, seed=3)
    chunked = induction_scores(tiny_model, seq_len=8, batch=4, seed=3, tokens_per_forward=17)  # one row per pass
    np.testing.assert_allclose(chunked.scores, whole.scores, atol=1e-12)
    np.testing.assert_allclose(chunked.loss_by_position, whole.loss_by_position, atol=1e-9)


def test_induction_scores_match_a_direct_computation(tiny_model):
    """Scores from the streaming hook equal the stripes read off a full cache."""
    from core.induction import repeated_random_tokens

    seq_len, batch = 6, 2
    result = induction_scores(tiny_model, seq_len=seq_len, batch=batch, seed=5)
    tokens = repeated_random_tokens(tiny_model, seq_len, batch, seed=5)
    with torch.no_grad():
        _, cache = tiny_model.run_with_cache(tokens)
    for layer in range(2):
        pattern = cache["pattern", layer].double()  # [batch, head, dest, src]
        second = range(seq_len + 1, 2 * seq_len + 1)
        induction = torch.stack([pattern[:, :, d, d - seq_len + 1] for d in second], -1).mean((0, 2))
        previous = torch.stack([pattern[:, :, d, d - 1] for d in range(1, 2 * seq_len + 1)], -1).mean((0, 2))
        duplicate = torch.stack([pattern[:, :, d, d - seq_len] for d in second], -1).mean((0, 2))
        np.testing.assert_allclose(result.scores[layer], induction.cpu().numpy(), atol=1e-6)
        np.testing.assert_allclose(result.prev_token_scores[layer], previous.cpu().numpy(), atol=1e-6)
        np.testing.assert_allclose(result.duplicate_token_scores[layer], duplicate.cpu().numpy(), atol=1e-6)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(seq_len=1), "seq_len must be between 2 and 31"),
        (dict(seq_len=32), "seq_len must be between 2 and 31"),
        (dict(batch=0), "batch must be between 1 and 64"),
        (dict(batch=65), "batch must be between 1 and 64"),
        (dict(batch=2.5), "batch must be a whole number"),
        (dict(seed=-1), "seed must be between"),
        (dict(batch=float("inf")), "batch must be a whole number"),
        (dict(seq_len=float("nan")), "seq_len must be a whole number"),
        (dict(seed=1e300), r"seed must be between 0 and 4294967295, got 1e\+300\."),
    ],
)
def test_induction_rejects_out_of_range(tiny_model, kwargs, message):
    with pytest.raises(ValueError, match=message):
        induction_scores(tiny_model, **{"seq_len": 8, **kwargs})


def test_induction_requests_are_limited_in_tokens(tiny_model):
    """batch x (2 x seq_len + 1) tokens per request: the cost of a request (README: Limits)."""
    limit = LIMITS.max_induction_tokens
    batch = limit // 63  # the largest batch at seq_len 31 (63 tokens a sequence) fits; one more does not
    assert induction_scores(tiny_model, seq_len=31, batch=batch).scores.shape == (2, 4)
    with pytest.raises(ValueError, match=f"= {(batch + 1) * 63:,} tokens is more than the limit of {limit:,} per request"):
        induction_scores(tiny_model, seq_len=31, batch=batch + 1)


def test_patching_shapes_and_json(tiny_model):
    clean, corrupted = "When John and Mary went to the store", "When John and Paul went to the store"
    result = activation_patching(tiny_model, clean, corrupted, " Mary", " John")
    n_pos = len(result.clean_tokens)
    assert result.resid_pre.shape == result.attn_out.shape == result.mlp_out.shape == (2, n_pos)
    assert result.head_out.shape == result.head_dla.shape == (2, 4)
    # positions before the first differing token (" Mary" vs " Paul", position 4) are identical in both runs
    assert np.allclose(result.resid_pre[:, :4], 0.0, atol=1e-6)
    data = json.loads(json.dumps(result.to_dict()))
    assert list(data) == [
        "clean_tokens", "corrupted_tokens", "clean_value", "corrupted_value", "swing", "min_swing", "swing_warning",
        "resid_pre", "attn_out", "mlp_out", "head_out", "head_dla", "pearson_r",
    ]
    assert data["swing"] == result.clean_value - result.corrupted_value
    assert (data["swing_warning"] is None) == (abs(data["swing"]) >= data["min_swing"])


def test_patching_rejects_different_lengths_showing_both(tiny_model):
    with pytest.raises(ValueError, match=r"same number of tokens.*clean has 5 .*corrupted has 6"):
        activation_patching(tiny_model, "When John and Mary", "When John and Mary Ann", " Mary", " John")


def test_patching_rejects_identical_metric(tiny_model):
    with pytest.raises(ValueError, match="same logit difference"):
        activation_patching(tiny_model, PROMPT, PROMPT, " Mary", " John")


def test_patching_rejects_same_answers(tiny_model):
    with pytest.raises(ValueError, match="answer and the wrong answer are the same token"):
        activation_patching(tiny_model, PROMPT, PROMPT.replace(", John gave", ", Mary gave"), " Mary", " Mary")


def test_activation_caches_keep_only_the_hooks_a_technique_needs(tiny_model, monkeypatch):
    """What each technique caches: nothing more than it reads (memory stays small). The bridge
    also files some tensors under alias names (attn.o.hook_in for attn.hook_z); those are the
    same tensors, so memory is counted by distinct storage."""
    cached: list[dict] = []
    predict(tiny_model, PROMPT)  # the fast engine's one check against the model's whole cache, first

    def spy(original):
        def spied(*args, **kwargs):
            logits, cache = original(*args, **kwargs)
            cached.append(dict(cache.items()))
            return logits, cache

        return spied

    monkeypatch.setattr(core.model, "prompt_pass", spy(core.model.prompt_pass))  # a prompt pass, on the fast engine or through hooks
    monkeypatch.setattr(tiny_model, "run_with_cache", spy(tiny_model.run_with_cache))  # any other pass through hooks
    n_layers = tiny_model.cfg.n_layers

    def tensors_of(call) -> dict[str, torch.Tensor]:
        cached.clear()
        call()
        distinct = {}
        for cache in cached:
            for name, tensor in cache.items():
                distinct.setdefault(tensor.data_ptr(), name)
        return distinct

    assert list(tensors_of(lambda: attention_patterns(tiny_model, PROMPT, 1)).values()) == ["blocks.1.attn.hook_pattern"]
    lens = tensors_of(lambda: logit_lens(tiny_model, PROMPT, " Mary"))
    assert len(lens) <= 2 * n_layers
    dla = tensors_of(lambda: direct_logit_attribution(tiny_model, PROMPT, " Mary", " John"))
    assert len(dla) == 2 * n_layers + 4, sorted(dla.values())  # z and mlp_out per layer, embed, pos_embed, final resid, final scale
    clean, corrupted = "When John and Mary went to the store", "When John and Paul went to the store"
    assert tensors_of(lambda: activation_patching(tiny_model, clean, corrupted, " Mary", " John")) == {}  # fast path: no cache
