"""Call a running CircuitBreaker from your own script with gradio_client.

    python examples/client.py                       # the app started locally with `python app.py`
    python examples/client.py https://<your-space>.hf.space

Every endpoint returns plain JSON (lists of lists for matrices); see README.md for the keys.
"""

from __future__ import annotations

import sys

from gradio_client import Client


def main() -> None:
    client = Client(sys.argv[1] if len(sys.argv) > 1 else "http://127.0.0.1:7860/", verbose=False)
    prompt = "When John and Mary went to the store, John gave a bottle of milk to"

    top = client.predict(prompt, 5, api_name="/predict")
    print("top-5:", list(zip(top["top_tokens"], [round(p, 4) for p in top["top_probs"]])))

    dla = client.predict(prompt, " Mary", " John", api_name="/dla")
    heads = [(f"L{l}H{h}", v) for l, row in enumerate(dla["heads"]) for h, v in enumerate(row)]
    print(f"logit(' Mary') - logit(' John') = {dla['value']:+.3f}; parts sum to {dla['total']:+.3f}")
    print("largest head contributions:", sorted(heads, key=lambda item: -abs(item[1]))[:3])

    patching = client.predict(
        prompt, prompt.replace(", John gave", ", Mary gave"), " Mary", " John", api_name="/patching"
    )
    print(f"clean {patching['clean_value']:+.3f}, corrupted {patching['corrupted_value']:+.3f}, "
          f"Pearson r(head patching, head DLA) = {patching['pearson_r']}")

    approx = client.predict(  # the linear approximation: same keys, "approximate": true
        prompt, prompt.replace(", John gave", ", Mary gave"), " Mary", " John", api_name="/attribution_patching"
    )
    exact_heads = [v for row in patching["head_out"] for v in row]
    approx_heads = [v for row in approx["head_out"] for v in row]
    worst = max(abs(a - e) for a, e in zip(approx_heads, exact_heads))
    print(f"attribution patching (approximate={approx['approximate']}): largest head error vs exact {worst:.3f}")


if __name__ == "__main__":
    main()
