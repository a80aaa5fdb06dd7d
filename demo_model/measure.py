"""What the demo model learned, measured with `core` exactly as the app measures it.

    python demo_model/measure.py [MODEL_DIR]

Used by the training script, by the tests (the committed model and a retrained one must both
pass `check`), and for the README's numbers.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from core import activation_patching, induction_scores, load_model, predict  # noqa: E402
from core.model import single_token_id, to_tokens  # noqa: E402
from demo_model import corpus  # noqa: E402

EIFFEL = "The Eiffel Tower is located in the city of"
INDUCTION = dict(seq_len=20, batch=20, seed=0)


def logit_differences(model, prompts: list[tuple[str, str, str]]) -> np.ndarray:
    """logit(first name) - logit(second name) at the final position, for (prompt, good, bad) triples."""
    by_length: dict[int, list[int]] = {}
    encoded = [to_tokens(model, prompt)[0] for prompt, _, _ in prompts]
    for i, tokens in enumerate(encoded):
        by_length.setdefault(len(tokens), []).append(i)
    values = np.zeros(len(prompts))
    with torch.no_grad():
        for indices in by_length.values():
            logits = model(torch.stack([encoded[i] for i in indices]))[:, -1]
            for row, i in enumerate(indices):
                _, good, bad = prompts[i]
                good_id = single_token_id(model, " " + good.strip(), "name")
                bad_id = single_token_id(model, " " + bad.strip(), "name")
                values[i] = float(logits[row, good_id] - logits[row, bad_id])
    return values


def measure(model_dir: str) -> dict:
    model = load_model(model_dir)
    examples = json.loads(corpus.EXAMPLES_FILE.read_text(encoding="utf-8"))
    all_ioi = logit_differences(model, corpus.all_ioi_prompts())
    example_ioi = logit_differences(model, [(ex["clean"], ex["answer"], ex["wrong"]) for ex in examples["contrast"]])
    example_ioi_corrupted = logit_differences(model, [(ex["corrupted"], ex["wrong"], ex["answer"]) for ex in examples["contrast"]])
    eiffel = predict(model, EIFFEL, k=3)
    induction = induction_scores(model, **INDUCTION)
    layer, head = np.unravel_index(int(induction.scores[1:].argmax()), induction.scores[1:].shape)
    seq_len = INDUCTION["seq_len"]
    patching = activation_patching(model, corpus.SEED_CLEAN, corpus.SEED_CORRUPTED, corpus.SEED_ANSWER, corpus.SEED_WRONG)
    s2 = patching.clean_tokens.index(corpus.SEED_WRONG, 3)  # the second " John": the only position that differs
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
        "loss_first_half": float(induction.loss_by_position[:seq_len].mean()),
        "loss_second_half": float(induction.loss_by_position[seq_len:].mean()),
        "seed_pair_clean": patching.clean_value,
        "seed_pair_corrupted": patching.corrupted_value,
        "resid_pre_at_s2_by_layer": [round(float(v), 3) for v in patching.resid_pre[:, s2]],
        "resid_pre_at_end_by_layer": [round(float(v), 3) for v in patching.resid_pre[:, -1]],
    }


def check(m: dict) -> list[str]:
    """The behaviour issue #4 asks for; an empty list means every requirement holds."""
    failures = []
    if min(m["example_ioi_logit_diffs"]) < 2:
        failures.append(f"an example IOI prompt has logit diff < 2: {m['example_ioi_logit_diffs']}")
    if m["eiffel_top"][0] != " Paris":
        failures.append(f"' Paris' is not the top prediction for the Eiffel Tower: {m['eiffel_top']}")
    if m["best_induction_score"] < 0.8:
        failures.append(f"no head in a layer >= 1 scores >= 0.8 on induction: best {m['best_induction_score']:.3f}")
    if m["loss_second_half"] > m["loss_first_half"] / 4:
        failures.append(f"loss on the repeat is not far below the first half: {m['loss_first_half']:.2f} -> {m['loss_second_half']:.2f}")
    if min(m["resid_pre_at_s2_by_layer"][:2]) < 0.9:
        failures.append(f"patching resid_pre at S2 in early layers does not restore the clean run: {m['resid_pre_at_s2_by_layer']}")
    return failures


def report(m: dict) -> str:
    lines = [f"{key}: {value}" for key, value in m.items()]
    failures = check(m)
    lines.append("checks: " + ("all pass" if not failures else "; ".join(failures)))
    return "\n".join(lines)


if __name__ == "__main__":
    print(report(measure(sys.argv[1] if len(sys.argv) > 1 else str(Path(__file__).resolve().parent / "weights"))))
