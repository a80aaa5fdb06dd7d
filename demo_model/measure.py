"""What the demo model learned, measured with `core` exactly as the app measures it.

    python -m demo_model.measure [MODEL_DIR]

Used by the training script, by the tests (the committed model and a retrained one must both
pass `check`), and for the README's numbers.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from core import activation_patching, induction_scores, load_model, predict
from core.contrast import LogitDiff
from core.model import single_token_id, to_tokens
from core.tasks import metric_values
from demo_model import corpus
from examples import EIFFEL, EXAMPLES

INDUCTION = dict(seq_len=20, batch=20, seed=0)


def logit_differences(model, prompts: list[tuple[str, str, str]]) -> np.ndarray:
    """logit(first name) - logit(second name) at the final position, for (prompt, good, bad) triples."""
    name = lambda text: single_token_id(model, " " + text.strip(), "name")  # noqa: E731
    return metric_values(model, [(to_tokens(model, prompt), LogitDiff(name(good), name(bad))) for prompt, good, bad in prompts])


def measure(model_dir: str) -> dict:
    model = load_model(model_dir)
    all_ioi = logit_differences(model, corpus.all_ioi_prompts())
    example_ioi = logit_differences(model, [(ex["clean"], ex["answer"], ex["wrong"]) for ex in EXAMPLES["contrast"]])
    example_ioi_corrupted = logit_differences(model, [(ex["corrupted"], ex["wrong"], ex["answer"]) for ex in EXAMPLES["contrast"]])
    eiffel = predict(model, EIFFEL, k=3)
    induction = induction_scores(model, **INDUCTION)
    layer, head = np.unravel_index(int(induction.scores[1:].argmax()), induction.scores[1:].shape)
    seq_len = INDUCTION["seq_len"]
    previous = np.unravel_index(int(induction.prev_token_scores.argmax()), induction.prev_token_scores.shape)
    # the best induction head's layer, and its heads' scores again with the previous-token head zero-ablated
    ablated = ablated_induction_scores(model, *previous)[layer + 1]
    patching = activation_patching(model, corpus.SEED_CLEAN, corpus.SEED_CORRUPTED, corpus.SEED_ANSWER, corpus.SEED_WRONG)
    s2 = patching.clean_tokens.index(corpus.SEED_WRONG, 3)  # the second " John": the only position that differs
    heads = np.argsort(-np.abs(patching.head_out).ravel())
    return {
        "n_params": int(sum(p.numel() for p in model.original_model.parameters())),
        "n_layers": model.cfg.n_layers,
        "n_heads": model.cfg.n_heads,
        "d_model": model.cfg.d_model,
        "vocab": model.cfg.d_vocab,
        "ioi_mean_logit_diff": float(all_ioi.mean()),
        "ioi_min_logit_diff": float(all_ioi.min()),
        "ioi_fraction_correct": float((all_ioi > 0).mean()),
        "ioi_prompts": len(all_ioi),
        "example_ioi_logit_diffs": [round(float(v), 3) for v in example_ioi],
        "example_ioi_corrupted_logit_diffs": [round(float(v), 3) for v in example_ioi_corrupted],
        "eiffel_top": eiffel.top_tokens,
        "eiffel_top_probs": [round(float(p), 4) for p in eiffel.top_probs],
        "best_induction_head": f"L{layer + 1}H{head}",
        "best_induction_score": float(induction.scores[1:].max()),
        "induction_heads": [f"L{h['layer']}H{h['head']} {h['score']:.3f}" for h in induction.induction_heads],
        "previous_token_head": f"L{previous[0]}H{previous[1]} {induction.prev_token_scores[previous]:.3f}",
        "induction_layer_scores": [round(float(v), 3) for v in induction.scores[layer + 1]],
        "induction_layer_scores_previous_token_head_ablated": [round(float(v), 3) for v in ablated],
        "loss_first_half": float(induction.loss_by_position[:seq_len].mean()),
        "loss_second_half": float(induction.loss_by_position[seq_len:].mean()),
        "seed_pair_clean": patching.clean_value,
        "seed_pair_corrupted": patching.corrupted_value,
        "resid_pre_at_s2_by_layer": [round(float(v), 3) for v in patching.resid_pre[:, s2]],
        "resid_pre_at_end_by_layer": [round(float(v), 3) for v in patching.resid_pre[:, -1]],
        "head_out_largest": [f"L{i // model.cfg.n_heads}H{i % model.cfg.n_heads} {patching.head_out.ravel()[i]:.3f}" for i in heads[:3]],
    }


def ablated_induction_scores(model, layer: int, head: int) -> np.ndarray:
    """Induction scores ([layer, head], the same test as `measure`) with one head's output zero-ablated."""

    def zero_head(z, hook):
        z[:, :, head] = 0.0
        return z

    with model.hooks(fwd_hooks=[(f"blocks.{layer}.attn.hook_z", zero_head)]):
        return induction_scores(model, **INDUCTION).scores


@dataclass(frozen=True)
class Bars:
    """What a demo model must show: `check` compares a measurement with these."""

    example_ioi_min: float = 2.0  # every example pair's clean IOI logit difference is at least this
    induction_min: float = 0.8  # some head in a layer >= 1 has at least this induction score
    loss_drop: float = 4.0  # loss on the repeat is at most the first half's / this
    s2_early_min: float = 0.9  # patching resid_pre at S2 restores at least this at layers 0 and 1


PROMISED = Bars()  # the committed weights: what the README and the app's examples rely on
# A retrain on other hardware (or another thread count) is in effect another seed. Four runs
# (README, "How reproducible a retrain is") gave best induction 0.819-0.895 (mean 0.861, sd 0.039),
# example IOI minimum 2.69-4.30 (mean 3.28, sd 0.73), repeat loss 17-21x lower, S2 patching 1.00 at
# layers 0-1. These bars sit about 4 sd below those means: a retrain anywhere passes while the recipe
# works, and fails when it stops producing the behaviour (random heads score ~0.01-0.05 on induction).
REPRODUCED = Bars(example_ioi_min=0.5, induction_min=0.7, loss_drop=4.0, s2_early_min=0.9)


def check(m: dict, bars: Bars = PROMISED) -> list[str]:
    """Every way the measurement `m` falls short of `bars`; an empty list means all hold."""
    failures = []
    if min(m["example_ioi_logit_diffs"]) < bars.example_ioi_min:
        failures.append(f"an example IOI prompt has logit diff < {bars.example_ioi_min}: {m['example_ioi_logit_diffs']}")
    if m["eiffel_top"][0] != " Paris":
        failures.append(f"' Paris' is not the top prediction for the Eiffel Tower: {m['eiffel_top']}")
    if m["best_induction_score"] < bars.induction_min:
        failures.append(f"no head in a layer >= 1 scores >= {bars.induction_min} on induction: best {m['best_induction_score']:.3f}")
    if m["loss_second_half"] > m["loss_first_half"] / bars.loss_drop:
        failures.append(f"loss on the repeat is not below 1/{bars.loss_drop:g} of the first half's: {m['loss_first_half']:.2f} -> {m['loss_second_half']:.2f}")
    if min(m["resid_pre_at_s2_by_layer"][:2]) < bars.s2_early_min:
        failures.append(f"patching resid_pre at S2 in early layers does not restore the clean run: {m['resid_pre_at_s2_by_layer']}")
    return failures


def report(m: dict) -> str:
    lines = [f"{key}: {value}" for key, value in m.items()]
    failures = check(m)
    lines.append("checks: " + ("all pass" if not failures else "; ".join(failures)))
    return "\n".join(lines)


if __name__ == "__main__":
    print(report(measure(sys.argv[1] if len(sys.argv) > 1 else str(Path(__file__).resolve().parent / "weights"))))
