"""Every technique cross-checked against TransformerLens's own utilities on a GPT-2 Small-shaped
random model (real GPT-2 tokenizer, non-zero biases, non-unit LayerNorm gains) and, for
patching, on the trained demo model too."""

from __future__ import annotations

import dataclasses
import importlib

import numpy as np
import pytest
import torch
from transformer_lens import patching as tl_patching
from transformer_lens import utilities as tl_utils

import core.model
from core import (
    SWEEPS,
    activation_patching,
    agreement,
    attention_patterns,
    attribution_patching,
    direct_logit_attribution,
    induction_scores,
    logit_lens,
    predict,
    products,
)
from core.induction import repeated_random_tokens
from core.logit_lens import final_lens
from core.model import prompt_pass, to_tokens
from core.patching import exact
from core.patching.fast import Engine
from tests.conftest import IOI_CLEAN, IOI_CORRUPTED

TL_SWEEPS = {name: getattr(tl_patching, sweep.reference) for name, sweep in SWEEPS.items()}  # the same semantics, one forward pass per patch
# (model fixture, clean, corrupted): differing at one position, at several, right after BOS, at the end
PAIRS = [
    ("gpt2_shaped", "When John and Mary went to the store", "When John and Paul went to the store"),
    ("gpt2_shaped", "The cat sat on the mat", "The dog sat on the rug"),
    ("gpt2_shaped", "Alice plays the piano", "Bob plays the violin"),
    ("demo_model", IOI_CLEAN, IOI_CORRUPTED),
    ("demo_model", "When John and Mary went to the store, John gave a ball to", "When Tom and Sarah went to the park, Tom gave a ball to"),
    ("demo_model", "When John and Mary went to the store, John gave a ball to", "When John and Mary went to the store, John gave a ball at"),
]


def _best_conditioned_answers(model, clean, corrupted):
    """The token pair whose logit difference changes most between the prompts, so normalising
    by (clean - corrupted) does not amplify float noise on a random model."""
    with torch.no_grad():
        shift = model(to_tokens(model, clean))[0, -1] - model(to_tokens(model, corrupted))[0, -1]
    decode = model.tokenizer.decode
    return decode([int(shift.argmax())]), decode([int(shift.argmin())])


def transformer_lens_patching(model, clean, corrupted, answer, wrong, clean_value, corrupted_value) -> dict:
    """The four sweeps by transformer_lens.patching (one forward pass per patch), normalised."""
    answer_id, wrong_id = model.to_single_token(answer), model.to_single_token(wrong)

    def normalised(logits):
        value = logits[0, -1, answer_id] - logits[0, -1, wrong_id]
        return (value - corrupted_value) / (clean_value - corrupted_value)

    with torch.no_grad():
        _, clean_cache = model.run_with_cache(to_tokens(model, clean))
        corrupted_tokens = to_tokens(model, corrupted)
        return {name: sweep(model, corrupted_tokens, clean_cache, normalised).double().cpu().numpy() for name, sweep in TL_SWEEPS.items()}


@pytest.mark.parametrize("fixture, clean, corrupted", PAIRS)
def test_patching_equals_transformer_lens(request, fixture, clean, corrupted):
    model = request.getfixturevalue(fixture)
    answer, wrong = _best_conditioned_answers(model, clean, corrupted)
    assert exact.fast_engine(model) is not None  # the fast path is what is being checked
    ours = activation_patching(model, clean, corrupted, answer, wrong)
    reference = transformer_lens_patching(model, clean, corrupted, answer, wrong, ours.clean_value, ours.corrupted_value)
    for name, expected in reference.items():
        difference = np.abs(getattr(ours, name) - expected).max()
        assert difference <= 1e-4, f"{name}: max abs difference {difference:.2e}"
    dla = direct_logit_attribution(model, clean, answer, wrong)
    np.testing.assert_allclose(ours.head_dla, dla.heads, atol=1e-5 * (1 + np.abs(dla.heads).max()))
    # causal attention: positions before the first differing token are the same in both runs
    first_difference = next(i for i, (a, b) in enumerate(zip(ours.clean_tokens, ours.corrupted_tokens)) if a != b)
    assert first_difference > 0
    for name in (name for name, sweep in SWEEPS.items() if sweep.axis == "pos"):
        assert np.all(getattr(ours, name)[:, :first_difference] == 0.0)


def test_fast_path_equals_the_hook_engine_at_any_chunk_size(gpt2_shaped):
    clean, corrupted = "The cat sat on the mat", "The dog sat on the rug"
    answer, wrong = _best_conditioned_answers(gpt2_shaped, clean, corrupted)
    fast = activation_patching(gpt2_shaped, clean, corrupted, answer, wrong)
    chunked = activation_patching(gpt2_shaped, clean, corrupted, answer, wrong, rows_per_pass=7)  # many small chunks
    hooks = activation_patching(gpt2_shaped, clean, corrupted, answer, wrong, engine="hooks")
    for name in SWEEPS:
        np.testing.assert_allclose(getattr(chunked, name), getattr(fast, name), atol=1e-5)
        np.testing.assert_allclose(getattr(hooks, name), getattr(fast, name), atol=1e-4)


def test_a_fast_engine_that_disagrees_with_the_model_is_never_used(demo_model, monkeypatch):
    clean, corrupted = PAIRS[3][1:]
    truth = activation_patching(demo_model, clean, corrupted, " Mary", " John")
    broken = Engine(demo_model)
    broken.b_U = broken.b_U + torch.arange(broken.b_U.shape[0], dtype=broken.b_U.dtype, device=broken.b_U.device)  # shifts the metric
    monkeypatch.setitem(exact._ENGINES, demo_model, broken)
    result = activation_patching(demo_model, clean, corrupted, " Mary", " John")
    assert exact._ENGINES[demo_model] is None  # dropped for this model from now on
    assert not broken.verified
    for name in SWEEPS:
        np.testing.assert_allclose(getattr(result, name), getattr(truth, name), atol=1e-4)


def test_attribution_patching_equals_the_gradient_from_backward_hooks(gpt2_shaped):
    """Nanda's recipe with TransformerLens backward hooks: (clean - corrupted act) . grad on the corrupted run."""
    model = gpt2_shaped
    clean, corrupted = PAIRS[1][1:]
    answer, wrong = _best_conditioned_answers(model, clean, corrupted)
    approx = attribution_patching(model, clean, corrupted, answer, wrong)
    answer_id, wrong_id = model.to_single_token(answer), model.to_single_token(wrong)
    names = lambda name: name.endswith(tuple(sweep.hook for sweep in SWEEPS.values()))  # noqa: E731
    grads, acts = {}, {}
    model.reset_hooks()
    model.add_hook(names, lambda grad, hook: grads.__setitem__(hook.name, grad.detach()), "bwd")
    model.add_hook(names, lambda act, hook: acts.__setitem__(hook.name, act.detach()), "fwd")
    try:
        with torch.enable_grad():
            logits = model(to_tokens(model, corrupted))
            (logits[0, -1, answer_id] - logits[0, -1, wrong_id]).backward()
    finally:
        model.reset_hooks()
        model.zero_grad(set_to_none=True)
    with torch.no_grad():
        _, clean_cache = model.run_with_cache(to_tokens(model, clean))
    swing = approx.clean_value - approx.corrupted_value
    for layer in range(model.cfg.n_layers):
        for name, sweep in SWEEPS.items():
            hooks = (sweep.hook, ".hook_in") if sweep.hook == "hook_resid_pre" else (sweep.hook,)
            key = next(k for k in grads if k.startswith(f"blocks.{layer}.") and k.endswith(hooks))
            product = ((clean_cache[f"blocks.{layer}.{sweep.hook}"] - acts[key]) * grads[key])[0].double()
            expected = (product.sum((0, 2)) if sweep.axis == "head" else product.sum(-1)).cpu().numpy() / swing
            np.testing.assert_allclose(getattr(approx, name)[layer], expected, atol=1e-4, err_msg=f"{name} layer {layer}")


@pytest.mark.parametrize("fixture", ["gpt2_shaped", "demo_model"])
def test_attribution_patching_equals_transformer_lenss_node_attribution(request, fixture):
    """TransformerLens 4.3's attribution_patch (node granularity: each head's output and each MLP's at each
    position) gives the same head_out (summed over positions) and mlp_out scores, once normalised."""
    from benchmarks.bench_patching import tl_attribution  # the benchmark's reference: TransformerLens's node scores as our sweeps

    model = request.getfixturevalue(fixture)
    clean, corrupted = IOI_CLEAN, IOI_CORRUPTED
    answer, wrong = _best_conditioned_answers(model, clean, corrupted)
    ours = attribution_patching(model, clean, corrupted, answer, wrong)
    a, w = model.to_single_token(answer), model.to_single_token(wrong)
    with torch.no_grad():  # the metric on the model's own logits: what the scores are normalised by
        clean_value, corrupted_value = (float(model(to_tokens(model, p))[0, -1, a] - model(to_tokens(model, p))[0, -1, w]) for p in (clean, corrupted))
    assert ours.clean_value == pytest.approx(clean_value, abs=1e-4) and ours.corrupted_value == pytest.approx(corrupted_value, abs=1e-4)
    swing = clean_value - corrupted_value
    reference = tl_attribution(model, to_tokens(model, clean), to_tokens(model, corrupted), a, w, swing)
    assert np.abs(reference["mlp_out"]).max() > 1e-3  # something to compare
    np.testing.assert_allclose(ours.head_out, reference["head_out"], atol=1e-4)
    np.testing.assert_allclose(ours.mlp_out, reference["mlp_out"], atol=1e-4)


def test_attribution_patching_is_the_same_on_the_models_own_passes(gpt2_shaped, monkeypatch):
    """On the fast engine (both runs, the corrupted one differentiated through it), without it (the bridge's
    runs and hooks), and then for a model whose forward has no logits_to_keep
    (every position's logits, the final one read), attribution patching gives the fast path's answer."""
    model = gpt2_shaped
    args = (IOI_CLEAN, IOI_CORRUPTED, *_best_conditioned_answers(model, IOI_CLEAN, IOI_CORRUPTED))  # a swing float32 noise cannot rival
    engine, differentiated, run = exact.fast_engine(model), [], exact.fast_engine(model).run_with_cache

    def spy(*inputs, differentiable=False):
        differentiated.append(differentiable)
        return run(*inputs, differentiable=differentiable)

    monkeypatch.setattr(engine, "run_with_cache", spy)
    fast = attribution_patching(model, *args)
    assert engine.verified and differentiated[-2:] == [False, True]  # the fast path is one side: the clean pass, then the corrupted run with gradients
    monkeypatch.setitem(exact._ENGINES, model, None)
    runs = [attribution_patching(model, *args)]

    def without_logits_to_keep(forward):
        def call(*inputs, **options):
            if "logits_to_keep" in options:
                raise TypeError("forward() got an unexpected keyword argument 'logits_to_keep'")
            return forward(*inputs, **options)

        return call

    for name in ("run_with_hooks", "run_with_cache"):
        monkeypatch.setattr(model, name, without_logits_to_keep(getattr(model, name)))
    runs.append(attribution_patching(model, *args))
    for run in runs:
        assert run.clean_value == pytest.approx(fast.clean_value, abs=1e-4) and run.corrupted_value == pytest.approx(fast.corrupted_value, abs=1e-4)
        for name in SWEEPS:
            np.testing.assert_allclose(getattr(run, name), getattr(fast, name), atol=1e-4, err_msg=name)


def test_attribution_patching_tracks_exact_patching_on_the_demo_model(demo_model):
    clean, corrupted = PAIRS[3][1:]
    exact = activation_patching(demo_model, clean, corrupted, " Mary", " John")
    approx = attribution_patching(demo_model, clean, corrupted, " Mary", " John")
    assert approx.to_dict()["approximate"] is True
    stats = agreement(exact, approx)
    for name in SWEEPS:  # a linear estimate: it ranks the components right, the values are rougher
        assert stats[name]["top_k_overlap"] >= 8, stats
        assert stats[name]["pearson_r"] > 0.7, stats
        x, y = getattr(exact, name).ravel(), getattr(approx, name).ravel()
        assert stats[name]["slope"] == pytest.approx(np.linalg.lstsq(x[:, None], y, rcond=None)[0][0])  # through 0


def test_agreement_reports_an_approximation_of_the_wrong_size(demo_model):
    """Perfectly correlated but 3x too small: r and the top-10 overlap cannot see it, the slope does."""
    clean, corrupted = PAIRS[3][1:]
    exact = activation_patching(demo_model, clean, corrupted, " Mary", " John")
    third = dataclasses.replace(
        attribution_patching(demo_model, clean, corrupted, " Mary", " John"),
        **{name: getattr(exact, name) / 3 for name in SWEEPS},
    )
    stats = agreement(exact, third)
    for name in SWEEPS:
        assert stats[name]["pearson_r"] == pytest.approx(1.0) and stats[name]["top_k_overlap"] == stats[name]["top_k"]
        assert stats[name]["slope"] == pytest.approx(1 / 3)


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
            manual = (result @ direction).double().cpu().numpy()
            np.testing.assert_allclose(unscaled.heads[layer], manual, atol=1e-4)
            np.testing.assert_allclose(scaled.heads[layer], manual / float(scale), atol=1e-5)


def test_logit_lens_final_row_is_the_models_output(gpt2_shaped):
    result = logit_lens(gpt2_shaped, IOI_CLEAN, target=" Mary")
    with torch.no_grad():
        probs = torch.softmax(gpt2_shaped(to_tokens(gpt2_shaped, IOI_CLEAN))[0].double(), -1)  # [pos, vocab]
    np.testing.assert_allclose(result.top_probs[-1], probs.max(-1).values.cpu().numpy(), atol=1e-6)
    np.testing.assert_allclose(result.target_probs[-1], probs[:, 5335].cpu().numpy(), atol=1e-6)
    ranks = (probs > probs[:, 5335:5336]).sum(-1).cpu().numpy()
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
    np.testing.assert_allclose(result.target_probs[6], probs[:, 5335].cpu().numpy(), atol=1e-6)
    np.testing.assert_allclose(result.top_probs[6], probs.max(-1).values.cpu().numpy(), atol=1e-6)


def test_final_lens_is_the_lenss_final_position_for_each_token_from_one_pass(gpt2_shaped, monkeypatch):
    """Contrast Pairs' lens (the final position, the answer and the wrong token, one pass per prompt) equals the
    full lens's final column for each token: the same checkpoints, top tokens, probabilities and ranks."""
    passes = []
    monkeypatch.setattr(core.model, "prompt_pass", lambda *args: passes.append(args) or prompt_pass(*args))
    answer_lens, wrong_lens = final_lens(gpt2_shaped, IOI_CLEAN, " Mary", " John")
    assert len(passes) == 1
    for lens, target in ((answer_lens, " Mary"), (wrong_lens, " John")):
        full = logit_lens(gpt2_shaped, IOI_CLEAN, target)
        assert lens.tokens == full.tokens[-1:] and lens.layers == full.layers and lens.target == target
        assert [row[0] for row in lens.top_tokens] == [row[-1] for row in full.top_tokens]
        np.testing.assert_allclose(lens.top_probs[:, 0], full.top_probs[:, -1], rtol=0, atol=1e-7)
        np.testing.assert_allclose(lens.target_probs[:, 0], full.target_probs[:, -1], rtol=0, atol=1e-7)
        np.testing.assert_array_equal(lens.target_ranks[:, 0], full.target_ranks[:, -1])
    with pytest.raises(ValueError, match="at least one target"):
        final_lens(gpt2_shaped, IOI_CLEAN)


@pytest.mark.parametrize("block", [1000, 2048, 60000, "the engine's"])
def test_logit_lens_token_blocks_equal_one_full_product(gpt2_shaped, monkeypatch, block):
    """The lens unembeds a block of tokens at a time (the target's first): the same top token, logsumexp,
    target logit and rank as one [row, vocab] product, whatever the block size and wherever the target sits,
    on the model's own unembedding and on the fast engine's prepared blocks (core.products.prepare)."""
    lens_module = importlib.import_module("core.logit_lens")  # the module (core re-exports the function under its name)

    model = gpt2_shaped
    if block == "the engine's":
        logit_lens(model, IOI_CLEAN)  # its pass builds and checks the engine whose blocks the lens reads from then on
        engine_blocks = exact.checked_engine(model).unembed_blocks
        assert lens_module._unembed_blocks(model) is engine_blocks and all(products.prepared(weight) for _, weight, _ in engine_blocks)
    else:
        monkeypatch.setattr(lens_module, "checked_engine", lambda model: None)  # the model's own unembedding, cut here
        monkeypatch.setattr(lens_module, "DEFAULTS", dataclasses.replace(lens_module.DEFAULTS, vocab_block=block))
    rows = torch.randn(40, model.cfg.d_model, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        logits = rows @ model.W_U + model.b_U
        for target_id in (0, 1500, 5335, model.cfg.d_vocab - 1):
            top_logit, top_id, total, target_logit, rank = lens_module._unembed_summary(model, rows, target_id)
            torch.testing.assert_close(top_logit, logits.max(-1).values)
            assert torch.equal(top_id, logits.argmax(-1))
            torch.testing.assert_close(total, torch.logsumexp(logits.double(), -1).float())
            torch.testing.assert_close(target_logit, logits[:, target_id])
            assert (rank.long() - (logits > logits[:, target_id : target_id + 1]).sum(-1)).abs().max() <= 1  # float32 ties at most


def test_attention_equals_cached_pattern_and_rows_sum_to_one(gpt2_shaped):
    result = attention_patterns(gpt2_shaped, IOI_CLEAN, layer=5)
    assert exact.fast_engine(gpt2_shaped).verified  # read off the fast engine's pass: that is what is being checked
    with torch.no_grad():
        _, cache = gpt2_shaped.run_with_cache(to_tokens(gpt2_shaped, IOI_CLEAN))
    np.testing.assert_allclose(result.patterns, cache["pattern", 5][0].cpu().numpy(), atol=1e-6)  # float32 products added in another order
    np.testing.assert_allclose(result.patterns.sum(-1), 1.0, atol=1e-5)


@pytest.mark.parametrize("fixture", ["gpt2_shaped", "demo_model"])
def test_the_fast_engines_cache_equals_the_models_own(request, fixture):
    """Every activation the engine gives a prompt pass, under TransformerLens's hook names, equals the model's
    run_with_cache of it (same shape; float32 rounding), and its logits at the positions kept equal the model's,
    for two prompts in one padded batch (the runner's batched passes)."""
    model = request.getfixturevalue(fixture)
    engine = exact.fast_engine(model)
    first, second = to_tokens(model, IOI_CLEAN), to_tokens(model, "When John and Mary went to")
    tokens = torch.cat([first, torch.nn.functional.pad(second, (0, first.shape[-1] - second.shape[-1]))])
    keep = [second.shape[-1] - 1, first.shape[-1] - 1]
    with torch.no_grad():
        logits, cache = model.run_with_cache(tokens, names_filter=lambda name: name in engine.hook_names)
        ours, our_cache = engine.run_with_cache(tokens, engine.hook_names, keep)
    assert our_cache.keys() == engine.hook_names and len(engine.hook_names) == 9 * model.cfg.n_layers + 3
    torch.testing.assert_close(ours, logits[:, keep], rtol=1e-5, atol=1e-5 * logits.abs().max().item())
    for name, value in our_cache.items():
        expected = cache[name]
        assert value.shape == expected.shape, name
        torch.testing.assert_close(value, expected, rtol=1e-5, atol=1e-5 * (1 + expected.abs().max().item()), msg=name)


def test_a_prompt_pass_reads_hooks_the_engine_lacks_through_the_model(gpt2_shaped):
    """A pass that caches an activation the engine does not give (here the queries) runs through the model's hooks."""
    tokens = to_tokens(gpt2_shaped, IOI_CLEAN)
    names = frozenset({"blocks.3.attn.hook_q", "blocks.3.hook_resid_pre"})
    assert exact.prompt_engine(gpt2_shaped, names) is None and exact.prompt_engine(gpt2_shaped, names - {"blocks.3.attn.hook_q"}) is not None
    logits, cache = prompt_pass(gpt2_shaped, tokens, names, [tokens.shape[-1] - 1])
    with torch.no_grad():
        _, expected = gpt2_shaped.run_with_cache(tokens)
    assert logits.shape[1] == 1 and torch.equal(cache["blocks.3.attn.hook_q"], expected["blocks.3.attn.hook_q"])


def test_prompt_techniques_never_use_a_fast_engine_that_disagrees_with_the_model(tiny_model, monkeypatch):
    """Predictions, the lens, DLA and attention: an engine whose logits are off fails its check against the model's
    cache, is dropped, and every answer comes from the model's own pass."""
    calls = [(predict, 5), (logit_lens, " Mary"), (direct_logit_attribution, " Mary", " John"), (attention_patterns, 1)]
    monkeypatch.setitem(exact._ENGINES, tiny_model, None)  # the model's own pass: the truth
    truth = [fn(tiny_model, IOI_CLEAN, *args).to_dict() for fn, *args in calls]
    broken = Engine(tiny_model)
    off = [(start, weight, bias + torch.arange(start, start + len(bias), dtype=bias.dtype) / 100) for start, weight, bias in broken.unembed_blocks]
    broken.unembed_blocks = tuple(off)  # changes every logit
    monkeypatch.setitem(exact._ENGINES, tiny_model, broken)
    results = [fn(tiny_model, IOI_CLEAN, *args).to_dict() for fn, *args in calls]
    assert exact._ENGINES[tiny_model] is None  # dropped for this model from now on
    assert not broken.verified and results == truth


def test_induction_on_the_fast_engine_equals_the_bridges_cache_and_loss(gpt2_shaped):
    """Scores read off TransformerLens's cache; the loss is its lm_cross_entropy_loss on the bridge's logits."""
    seq_len, batch = 20, 3
    result = induction_scores(gpt2_shaped, seq_len=seq_len, batch=batch, seed=2)
    assert exact.fast_engine(gpt2_shaped).verified  # the fast path is what is being checked
    tokens = repeated_random_tokens(gpt2_shaped, seq_len, batch, seed=2)
    with torch.no_grad():
        logits, cache = gpt2_shaped.run_with_cache(tokens)
    loss = tl_utils.lm_cross_entropy_loss(logits, tokens, per_token=True).double().mean(0)
    np.testing.assert_allclose(result.loss_by_position, loss.cpu().numpy(), rtol=1e-5)
    second = torch.arange(seq_len + 1, 2 * seq_len + 1)
    for layer in (0, 5, 11):
        pattern = cache["pattern", layer].double()  # [batch, head, dest, src]
        induction = pattern[:, :, second, second - seq_len + 1].mean((0, 2))
        duplicate = pattern[:, :, second, second - seq_len].mean((0, 2))
        previous = pattern.diagonal(-1, -2, -1).mean((0, 2))
        np.testing.assert_allclose(result.scores[layer], induction.cpu().numpy(), atol=1e-6)
        np.testing.assert_allclose(result.duplicate_token_scores[layer], duplicate.cpu().numpy(), atol=1e-6)
        np.testing.assert_allclose(result.prev_token_scores[layer], previous.cpu().numpy(), atol=1e-6)


@pytest.mark.parametrize("block", [1000, 2048, 60000])
def test_next_token_losses_in_token_blocks_equal_cross_entropy(gpt2_shaped, monkeypatch, block):
    fast_module = importlib.import_module("core.patching.fast")
    monkeypatch.setattr(fast_module, "DEFAULTS", dataclasses.replace(fast_module.DEFAULTS, vocab_block=block))
    engine = Engine(gpt2_shaped)  # an engine cuts its unembedding into blocks when it is built
    assert len(engine.unembed_blocks) == -(-gpt2_shaped.cfg.d_vocab // block)
    generator = torch.Generator().manual_seed(0)
    final = 3 * torch.randn(2, 9, gpt2_shaped.cfg.d_model, generator=generator)
    tokens = torch.randint(0, gpt2_shaped.cfg.d_vocab, (2, 9), generator=generator)
    with torch.no_grad():
        logits = engine._ln(final, engine.ln_final) @ gpt2_shaped.W_U + gpt2_shaped.b_U
        expected = torch.nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1), tokens[:, 1:].flatten(), reduction="none")
        torch.testing.assert_close(engine.next_token_losses(final, tokens), expected.view(2, 8))


def test_induction_never_uses_a_fast_engine_that_disagrees_with_the_model(tiny_model, monkeypatch):
    truth = induction_scores(tiny_model, seq_len=8, batch=3, seed=1)
    broken = Engine(tiny_model)
    broken.b_U = broken.b_U + torch.arange(broken.b_U.shape[0], dtype=broken.b_U.dtype) / 100  # changes every loss
    monkeypatch.setitem(exact._ENGINES, tiny_model, broken)
    result = induction_scores(tiny_model, seq_len=8, batch=3, seed=1)
    assert exact._ENGINES[tiny_model] is None  # dropped for this model from now on
    assert not broken.verified
    np.testing.assert_allclose(result.loss_by_position, truth.loss_by_position, rtol=1e-6)
    np.testing.assert_allclose(result.scores, truth.scores, atol=1e-7)
