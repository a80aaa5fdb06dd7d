"""Every technique cross-checked against TransformerLens's own utilities on a GPT-2 Small-shaped
random model (real GPT-2 tokenizer, non-zero biases, non-unit LayerNorm gains)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from transformer_lens import patching as tl_patching

from core import activation_patching, attention_patterns, direct_logit_attribution, logit_lens
from core.model import to_tokens
from tests.conftest import IOI_CLEAN

TL_SWEEPS = {
    "resid_pre": tl_patching.get_act_patch_resid_pre,
    "attn_out": tl_patching.get_act_patch_attn_out,
    "mlp_out": tl_patching.get_act_patch_mlp_out,
    "head_out": tl_patching.get_act_patch_attn_head_out_all_pos,
}
PAIRS = [
    ("When John and Mary went to the store", "When John and Paul went to the store"),  # one position differs
    ("The cat sat on the mat", "The dog sat on the rug"),  # two positions differ
]


def _best_conditioned_answers(model, clean, corrupted):
    """The token pair whose logit difference changes most between the prompts, so normalising
    by (clean - corrupted) does not amplify float noise on a random model."""
    with torch.no_grad():
        shift = model(to_tokens(model, clean))[0, -1] - model(to_tokens(model, corrupted))[0, -1]
    decode = model.tokenizer.decode
    return decode([int(shift.argmax())]), decode([int(shift.argmin())])


@pytest.mark.parametrize("clean, corrupted", PAIRS)
def test_patching_equals_transformer_lens(gpt2_shaped, clean, corrupted):
    answer, wrong = _best_conditioned_answers(gpt2_shaped, clean, corrupted)
    ours = activation_patching(gpt2_shaped, clean, corrupted, answer, wrong)
    answer_id, wrong_id = gpt2_shaped.to_single_token(answer), gpt2_shaped.to_single_token(wrong)

    def normalised(logits):
        value = logits[0, -1, answer_id] - logits[0, -1, wrong_id]
        return (value - ours.corrupted_value) / (ours.clean_value - ours.corrupted_value)

    clean_tokens, corrupted_tokens = to_tokens(gpt2_shaped, clean), to_tokens(gpt2_shaped, corrupted)
    with torch.no_grad():
        _, clean_cache = gpt2_shaped.run_with_cache(clean_tokens)
        for name, tl_sweep in TL_SWEEPS.items():
            reference = tl_sweep(gpt2_shaped, corrupted_tokens, clean_cache, normalised).double().numpy()
            difference = np.abs(getattr(ours, name) - reference).max()
            assert difference <= 1e-4, f"{name}: max abs difference {difference:.2e}"
    # causal attention: positions before the first differing token are the same in both runs
    first_difference = next(i for i, (a, b) in enumerate(zip(ours.clean_tokens, ours.corrupted_tokens)) if a != b)
    assert first_difference > 0 and np.abs(ours.resid_pre[:, :first_difference]).max() < 1e-5


def test_dla_parts_sum_to_the_logit_difference(gpt2_shaped):
    result = direct_logit_attribution(gpt2_shaped, IOI_CLEAN, " Mary", " John")
    assert result.total == pytest.approx(result.value, abs=1e-3)
    assert result.bias != 0.0  # the random model has attention and unembedding biases


def test_dla_heads_equal_a_manual_z_times_w_o_computation(gpt2_shaped):
    """stack_head_results + apply_ln_to_stack, as we use them, equal (z @ W_O), centred,
    divided by the final LayerNorm scale, projected on W_U[:, Mary] - W_U[:, John]."""
    model = gpt2_shaped
    scaled = direct_logit_attribution(model, IOI_CLEAN, " Mary", " John")
    unscaled = direct_logit_attribution(model, IOI_CLEAN, " Mary", " John", scale_by_ln=False)
    mary, john = model.to_single_token(" Mary"), model.to_single_token(" John")
    direction = model.W_U[:, mary] - model.W_U[:, john]
    with torch.no_grad():
        _, cache = model.run_with_cache(to_tokens(model, IOI_CLEAN))
        scale = cache["ln_final.hook_scale"][0, -1, 0]
        for layer in range(model.cfg.n_layers):
            z = cache["z", layer][0, -1]  # [head, d_head]
            result = torch.einsum("hd,hdm->hm", z, model.W_O[layer])
            result = result - result.mean(-1, keepdim=True)
            manual = (result @ direction).double().numpy()
            np.testing.assert_allclose(unscaled.heads[layer], manual, atol=1e-4)
            np.testing.assert_allclose(scaled.heads[layer], manual / float(scale), atol=1e-5)


def test_logit_lens_final_row_is_the_models_output(gpt2_shaped):
    result = logit_lens(gpt2_shaped, IOI_CLEAN, target=" Mary")
    with torch.no_grad():
        probs = torch.softmax(gpt2_shaped(to_tokens(gpt2_shaped, IOI_CLEAN))[0].double(), -1)  # [pos, vocab]
    np.testing.assert_allclose(result.top_probs[-1], probs.max(-1).values.numpy(), atol=1e-6)
    np.testing.assert_allclose(result.target_probs[-1], probs[:, 5335].numpy(), atol=1e-6)
    ranks = (probs > probs[:, 5335:5336]).sum(-1).numpy()
    np.testing.assert_array_equal(result.target_ranks[-1], ranks)


def test_logit_lens_middle_layer_normalises_that_checkpoint_afresh(gpt2_shaped):
    """Checkpoint 6_pre: (x - mean) / sqrt(var + eps) of resid_pre 6, unembedded; not the final scale."""
    model = gpt2_shaped
    result = logit_lens(model, IOI_CLEAN, target=" Mary")
    with torch.no_grad():
        _, cache = model.run_with_cache(to_tokens(model, IOI_CLEAN))
        x = cache["resid_pre", 6][0].double()
        x = x - x.mean(-1, keepdim=True)
        normed = x / torch.sqrt(x.pow(2).mean(-1, keepdim=True) + model.cfg.eps)
        probs = torch.softmax(normed @ model.W_U.double() + model.b_U.double(), -1)
    assert result.layers[6] == "6_pre"
    np.testing.assert_allclose(result.target_probs[6], probs[:, 5335].numpy(), atol=1e-6)
    np.testing.assert_allclose(result.top_probs[6], probs.max(-1).values.numpy(), atol=1e-6)


def test_attention_equals_cached_pattern_and_rows_sum_to_one(gpt2_shaped):
    result = attention_patterns(gpt2_shaped, IOI_CLEAN, layer=5)
    with torch.no_grad():
        _, cache = gpt2_shaped.run_with_cache(to_tokens(gpt2_shaped, IOI_CLEAN))
    np.testing.assert_allclose(result.patterns, cache["pattern", 5][0].numpy(), atol=1e-7)
    np.testing.assert_allclose(result.patterns.sum(-1), 1.0, atol=1e-5)
