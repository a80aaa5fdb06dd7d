"""Every technique from `core`, as a notebook user would call it.

    python -m examples.quickstart                 # GPT-2 Small (needs internet once)
    python -m examples.quickstart --model demo    # the small demo model bundled with CircuitBreaker (offline)
    python -m examples.quickstart --model DIR     # a local Hugging Face model directory

Run from the repository root (as a module, it imports `core` from there). Prints the numbers and
writes one HTML file per figure to --out (default: figures/).
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path

os.environ.setdefault("TQDM_DISABLE", "1")

from core import (  # noqa: E402
    DEFAULTS,
    SWEEPS,
    ModelLoadError,
    activation_patching,
    attention_patterns,
    direct_logit_attribution,
    induction_scores,
    load_model,
    logit_lens,
    plots,
    predict,
)
from core.induction import max_seq_len  # noqa: E402
from examples import EIFFEL, IOI_CLEAN, IOI_CORRUPTED  # noqa: E402  (the app's examples, examples/prompts.json)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="gpt2", help="'gpt2' (default), 'demo' (the bundled demo model, offline) or a local Hugging Face model directory")
    parser.add_argument("--out", default="figures", help="folder for the HTML figures")
    args = parser.parse_args()
    try:
        model = load_model(args.model)
    except ModelLoadError as err:
        raise SystemExit(str(err)) from None
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)

    top = predict(model, EIFFEL, k=5)
    print("Top-5 after", repr(EIFFEL))
    for token, prob in zip(top.top_tokens, top.top_probs):
        print(f"  {token!r:>14} {prob:.4f}")

    lens = logit_lens(model, EIFFEL, target=" Paris")
    print("\nLogit lens at the final position: checkpoint, top-1, P(' Paris')")
    for layer, row, p in zip(lens.layers, lens.top_tokens, lens.target_probs[:, -1]):
        print(f"  {layer:>10} {row[-1]!r:>14} {p:.4f}")

    dla = direct_logit_attribution(model, IOI_CLEAN, " Mary", " John")
    n_heads = dla.heads.shape[1]
    order = abs(dla.heads).ravel().argsort()[::-1][:5]
    print(f"\nDLA of logit(' Mary') - logit(' John'): model {dla.value:+.3f}, parts sum {dla.total:+.3f}")
    for index in order:
        print(f"  L{index // n_heads}H{index % n_heads} {dla.heads.ravel()[index]:+.3f}")

    induction = induction_scores(model, seq_len=min(DEFAULTS.induction_seq_len, max_seq_len(model)))  # fits the model's context
    print("\nInduction heads (score > threshold):", [f"L{h['layer']}H{h['head']} {h['score']:.3f}" for h in induction.induction_heads])

    patching = activation_patching(model, IOI_CLEAN, IOI_CORRUPTED, " Mary", " John")
    print(
        f"\nIOI logit difference: clean {patching.clean_value:+.3f}, corrupted {patching.corrupted_value:+.3f}; "
        f"Pearson r(head patching, head DLA) = {patching.pearson_r:.3f}"
    )

    figures = {
        "logit_lens": plots.logit_lens_heatmap(lens),
        "logit_lens_final": plots.logit_lens_final(lens),
        "dla_heads": plots.dla_heads(dla),
        "dla_components": plots.dla_components(dla),
        "attention_layer5": plots.attention_heads(attention_patterns(model, IOI_CLEAN, layer=min(5, model.cfg.n_layers - 1))),
        "induction": plots.induction_heatmap(induction),
        "induction_layer_max": plots.induction_layer_max(induction),
        "loss_by_position": plots.loss_by_position(induction),
        "dla_vs_patching": plots.dla_vs_patching(patching),
        **{f"patching_{name}": plots.patching_heatmap(patching, name) for name in SWEEPS},
    }
    for name, figure in figures.items():
        figure.write_html(out / f"{name}.html", include_plotlyjs="directory")  # plotly.min.js beside them: works offline
    print(f"\nWrote {len(figures)} figures to {out}/")


if __name__ == "__main__":
    main()
