"""Settings in two places (no magic numbers inside functions):

- `DEFAULTS` (`Defaults`): the science. What a technique computes when not told otherwise, and how
  it batches its work (batch sizes change memory and time, never the numbers beyond rounding).
- `LIMITS` (`Limits`): serving. How much one request may ask for and how the server shares one
  model among many users (README: "Limits"). Core checks the input caps (a notebook user gets the
  same clear message as the API); the runner and the app read the rest.

Both are frozen; a test or a caller that needs other values passes its own (`Runner(limits=...)`,
`induction_scores(..., tokens_per_forward=...)`, `activation_patching(..., rows_per_pass=...)`).
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Defaults:
    model_name: str = "gpt2"  # what load_model() loads when given nothing
    top_k: int = 10  # predictions shown at the final position
    induction_seq_len: int = 50  # random tokens per copy (Olsson et al. use 50 too)
    induction_batch: int = 10  # random sequences averaged over
    induction_seed: int = 0  # same seed -> same sequences -> same scores
    induction_threshold: float = 0.6  # a head scoring above this is listed (the seed's cut-off)
    min_swing: float = 1.0  # |clean - corrupted| logit difference below this: scores flagged as noise-prone (odds change < e)
    same_metric_tolerance: float = 1e-6  # |clean - corrupted| below this cannot be normalised
    fast_path_tolerance: float = 1e-3  # the fast engine's unpatched runs must match the model's own this closely
    product_check_tolerance: float = 1e-5  # oneDNN's float32 product (core.products) must match torch's this closely, relative to the largest value
    routed_model_tolerance: float = 1e-4  # a model's logits with its products on oneDNN must match its own this closely, relative to the largest
    routing_timings: int = 3  # a model's products go to oneDNN only if its check runs faster there: timed this many times each way
    routing_gain: float = 1.1  # ... at least this many times as fast (where the two are close, torch's product stays)
    # --- how work is batched (memory and time, not results) ---
    tokens_per_forward: int = 1024  # batch x pos per forward pass, bounds memory (logits: 200 MB for GPT-2; README: "Limits")
    onednn_cached_products: int = 16  # oneDNN products kept prepared, one per shape with its buffers (core.products: its own 1,024 cost memory)
    prepared_rows: int = 128  # a prepared weight's layout suits products of about this many rows (core.products.prepare; 16-512 alike here, 1 slower)
    vocab_block: int = 2048  # unembeddings (logit lens, induction's loss) take this many tokens at a time (each block summarised in cache)
    patch_batch_size: int = 32  # patched runs evaluated together in one forward pass (hook engine)
    patch_rows_per_pass: int = 4096  # patched positions evaluated together by the fast engine (bounds memory)
    edge_floats_per_pass: int = 2**25  # edge scores / faithfulness: one pass holds every writer's output at this many floats' worth of positions (128 MB)
    eap_ig_steps: int = 5  # EAP-IG's interpolation steps from the corrupted embeddings to the clean ones
    faithfulness_points: int = 12  # circuits on the faithfulness curve, from one edge to all of them (log-spaced)
    circuit_edges: int = 20  # a circuit's size when the user names none
    edge_checks: int = 20  # top edges whose exact effect alone is computed beside their score
    progress_steps: int = 20  # exact patching reports progress at least this often when asked to
    path_senders: int = 3  # the Contrast Pairs tab proposes the heads patching ranks first as path patching senders


@dataclass(frozen=True)
class Limits:
    # --- what one request may ask for (each message names its limit) ---
    max_prompt_chars: int = 2000  # longer text is rejected before tokenizing (a megabyte answers at once)
    max_prompt_tokens: int = 128  # Prompt Explorer (BOS included); also never more than the model's n_ctx
    max_patching_tokens: int = 32  # Contrast Pairs: exact patching grows with the square of the positions after the first difference
    max_token_chars: int = 100  # a target / answer token longer than this cannot be one token
    max_top_k: int = 100  # largest k a caller may ask for
    max_induction_batch: int = 64  # Circuit Map: sequences per request
    max_task_pairs: int = 256  # contrast pairs in one task (built in or the user's)
    max_task_patching_pairs: int = 64  # pairs in one task patching / task path patching request
    max_eap_ig_steps: int = 20  # EAP-IG steps in one request (each a forward and backward pass over every pair)
    max_edge_checks: int = 100  # edges checked exactly in one circuit request
    max_patching_tflop: float = 5.0  # the matrix products one patching request may need (core.patching.cost; 64 IOI pairs' head sweep: 4.0)
    max_task_chars: int = 100_000  # the user's pairs as text (256 pairs of ~300 characters with room to spare)
    max_induction_tokens: int = 2048  # Circuit Map: batch x (2 x seq_len + 1) tokens per request (two passes at full context)
    max_downloads: int = 256  # JSON downloads kept on disk (oldest removed first)
    max_request_bytes: int = 2_000_000  # bodies over this are refused unread (a pasted megabyte still gets its sentence; queue: 64 x 2 MB)
    # --- how the server shares one model ---
    max_queue_size: int = 64  # requests waiting in the Gradio queue; more are turned away with a message
    max_requests_per_client: int = 32  # waiting + running requests from one address (half the queue: others keep room)
    lock_poll_s: float = 0.25  # a request waiting for the model checks this often whether it is still wanted
    max_batch_calls: int = 16  # one-pass calls (predictions, logit lens, DLA, attention, the Explorer) answered from one batched pass
    batch_poll_s: float = 0.02  # a call waiting in a batch checks this often whether another request's pass answered it
    max_wait_s: float = 120.0  # a request that cannot start within this long gets "busy, try again"
    drain_s: float = 20.0  # on SIGTERM, running requests get this long to finish (waiting ones are told to retry)
    hub_timeout_s: float = 2.0  # how long to wait for the Hugging Face Hub before giving up


DEFAULTS = Defaults()
LIMITS = Limits()
