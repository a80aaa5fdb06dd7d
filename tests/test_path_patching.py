"""Path patching (core.patching.path): cross-checked against transformer_lens.patching's
get_act_patch_direct_path (one forward pass per receiver) on the GPT-2-shaped and demo models; several
senders, MLPs and the embeddings against the hook engine; a task against its pairs one by one; what the
demo model really does; real GPT-2's name movers (marked)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from transformer_lens import patching as tl_patching

from core.contrast import ContrastPair
from core.patching.path import COMPONENTS, Sender, parse_senders, path_patching, path_patching_on, raw_path_values
from core.tasks import built_in_task
from tests.conftest import IOI_CLEAN, IOI_CORRUPTED
from tests.test_crosscheck import _best_conditioned_answers

# (model fixture, clean, corrupted, sender head): a late sender keeps TransformerLens's forward passes few. On the
# random GPT-2-shaped model a single path moves the metric by at most ~7e-4 of the gap (L9H10 here, the largest of
# layers 9-10), so there the pattern is checked too: the scores correlate with TransformerLens's.
CASES = [
    ("gpt2_shaped", "When John and Mary went to the store", "When John and Paul went to the store", (9, 10)),
    ("demo_model", IOI_CLEAN, IOI_CORRUPTED, (1, 2)),
    ("demo_model", IOI_CLEAN, IOI_CORRUPTED, (1, 3)),
]


@pytest.mark.parametrize("fixture, clean, corrupted, sender", CASES)
def test_path_patching_equals_transformer_lens(request, fixture, clean, corrupted, sender):
    model = request.getfixturevalue(fixture)
    answer, wrong = _best_conditioned_answers(model, clean, corrupted)
    ours = path_patching(model, clean, corrupted, answer, wrong, f"{sender[0]}.{sender[1]}")
    pair = ContrastPair.of(model, clean, corrupted, answer, wrong)
    clean_value, corrupted_value = float(ours.clean_values[0]), float(ours.corrupted_values[0])

    def normalised(logits):
        return (pair.metric.of_logits(logits)[0] - corrupted_value) / (clean_value - corrupted_value)

    checked = []
    with torch.no_grad():
        _, clean_cache = model.run_with_cache(pair.clean_tokens)
        _, corrupted_cache = model.run_with_cache(pair.corrupted_tokens)
        for component in COMPONENTS:
            theirs = tl_patching.get_act_patch_direct_path(
                model, pair.corrupted_tokens, clean_cache, corrupted_cache, normalised, *sender, component=component, verbose=False
            ).double().cpu().numpy()
            mine = getattr(ours, component)
            difference = np.abs(mine - theirs).max()
            assert difference <= 1e-4, f"{component}: max abs difference {difference:.2e}"
            receivers = slice(sender[0] + 1, None)
            if np.abs(theirs[receivers]).max() > 1e-4:
                checked.append(component)
                assert np.corrcoef(mine[receivers].ravel(), theirs[receivers].ravel())[0, 1] > 0.99, component
            assert np.all(mine[: sender[0] + 1] == 0.0) and ours.first_receiver_layer == sender[0] + 1
    assert checked  # a real effect was compared, not float noise


def test_several_senders_mlps_and_the_embeddings_equal_the_hook_engine(demo_model):
    pair = ContrastPair.of(demo_model, IOI_CLEAN, IOI_CORRUPTED, " Mary", " John")
    senders = parse_senders("embed, MLP0, L1H2, 2.0, MLP2", 5, 4)
    assert [s.name for s in senders] == ["embed", "MLP0", "L1H2", "L2H0", "MLP2"]
    fast = raw_path_values(demo_model, [pair], senders)[2]
    hooks = raw_path_values(demo_model, [pair], senders, engine="hooks")[2]
    for name in (*COMPONENTS, "logits", "head_to_logits"):
        np.testing.assert_allclose(fast[name], hooks[name], atol=1e-4, err_msg=name)  # logits, float32
    # a receiver at layer 1 gets only the embeddings' and MLP0's write, at layer 3 every sender's
    alone = raw_path_values(demo_model, [pair], parse_senders("embed MLP0", 5, 4))[2]
    for name in COMPONENTS:
        np.testing.assert_allclose(fast[name][0, :2], alone[name][0, :2], atol=1e-5)


def test_every_writer_sent_to_the_logits_restores_the_clean_run(demo_model):
    """The final residual stream is the sum of every write (the embeddings, each head, each MLP; the
    biases are the same in both runs), so sending them all to the logits gives the clean value: 1."""
    everything = "embed " + " ".join(f"{layer}.{head} MLP{layer}" for layer in range(5) for head in range(4))
    result = path_patching(demo_model, IOI_CLEAN, IOI_CORRUPTED, " Mary", " John", everything)
    assert result.logits == pytest.approx(1.0, abs=1e-5)
    assert result.first_receiver_layer == 0 and len(result.senders) == 1 + 5 * 5


def test_a_task_is_the_mean_of_its_pairs(demo_model):
    task = built_in_task(demo_model, "ioi", 6, seed=3)  # several token lengths: batched by length
    senders = parse_senders("MLP0 1.1", 5, 4)
    result = path_patching_on(demo_model, task, senders)
    pairs = task.contrast_pairs(demo_model)
    assert len({p.clean_tokens.shape[-1] for p in pairs}) > 1
    each = [raw_path_values(demo_model, [pair], senders) for pair in pairs]
    corrupted = np.array([c[0] for _, c, _ in each])
    gap = float(np.mean([c[0] - k[0] for c, k, _ in each]))
    assert result.gap == pytest.approx(gap, abs=1e-9) and result.n_pairs == 6
    for name in COMPONENTS:
        expected = np.mean([raw[name][0] for _, _, raw in each], 0) - corrupted.mean()
        expected[:1] = 0.0
        np.testing.assert_allclose(getattr(result, name), expected / gap, atol=1e-5, err_msg=name)


def test_the_demo_models_early_components_reach_L4H0_through_its_values(demo_model):
    """Measured (IOI, 32 pairs, seed 0): the embeddings and MLPs 0-3 sent together restore 0.83 of the
    gap through L4H0's value input, 0.02 through its keys, 0.00 through its query: L4H0 reads the names
    from the positions it attends to and copies them (MLP0 alone: 0.73)."""
    result = path_patching_on(demo_model, built_in_task(demo_model, "ioi", 32, seed=0), "embed MLP0 MLP1 MLP2 MLP3")
    assert result.v[4, 0] > 0.7 and abs(result.k[4, 0]) < 0.1 and abs(result.q[4, 0]) < 0.05
    assert np.unravel_index(np.abs(result.v).argmax(), result.v.shape) == (4, 0)


def test_the_previous_token_head_feeds_layer_2_through_the_keys(demo_model):
    """Measured (induction, 32 pairs, seed 0): L1H2's write into layer-2 keys moves the metric by up to
    0.15 of the gap (L2H2), its queries and values at most 0.02. The sign is negative because the keys
    alone are patched: they point the induction head at the corrupted run's token after the repeat's
    start, which is the task's wrong answer."""
    result = path_patching_on(demo_model, built_in_task(demo_model, "induction", 32, seed=0), "1.2")
    k, others = np.abs(result.k[2]).max(), max(np.abs(result.q[2]).max(), np.abs(result.v[2]).max())
    assert k > 0.1 and k > 4 * others
    assert np.unravel_index(np.abs(result.k).argmax(), result.k.shape)[0] == 2


@pytest.mark.parametrize(
    "text, message",
    [
        ("", "Name at least one sender"),
        ("9.9", "There is no '9.9'"),
        ("L4H4", "There is no 'L4H4'"),
        ("MLP7", "There is no 'MLP7'"),
        ("4.0, head", "'head' is not a sender"),
        (["4.0"], "must be text"),
    ],
)
def test_bad_senders_get_a_sentence(text, message):
    with pytest.raises(ValueError, match=message):
        parse_senders(text, 5, 4)


def test_senders_are_read_in_every_written_form():
    assert parse_senders("L4H0, 3.1;mlp2  M0 embed 4.0", 5, 4) == (Sender(4, 0), Sender(3, 1), Sender(2), Sender(0), Sender(-1))


@pytest.mark.gpt2
def test_gpt2_name_movers_write_the_answer_into_the_logits(gpt2):
    """Wang et al. (2022): the name movers 9.9, 9.6 and 10.0 write the indirect object's name into the
    final residual stream; the negative name movers 10.7 and 11.10 write against it (IOI, 64 pairs)."""
    result = path_patching_on(gpt2, built_in_task(gpt2, "ioi", 64, seed=0), "9.9 9.6 10.0")
    scores = result.head_to_logits
    order = [f"{layer}.{head}" for layer, head in zip(*np.unravel_index(np.argsort(-scores, axis=None), scores.shape))]
    assert {"9.9", "9.6", "10.0"} <= set(order[:5]) and {"10.7", "11.10"} <= set(order[-3:])
    assert result.logits > 0.2
