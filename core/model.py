"""The only place that knows how models are loaded and how text becomes tokens.

`load_model("gpt2")` boots GPT-2 Small from the Hugging Face Hub (or its local cache);
`load_model("/path/to/dir")` boots a local Hugging Face model directory with no network.
Either way the result is a TransformerLens 4 `TransformerBridge` in compatibility mode
(LayerNorm folded, writing weights and unembedding centred), so numbers match the
HookedTransformer literature.
"""

from __future__ import annotations

import functools
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable

import torch
from jaxtyping import Float, Int
from safetensors import SafetensorError
from torch import Tensor

from core import products
from core.config import DEFAULTS, LIMITS

if TYPE_CHECKING:
    from transformer_lens import ActivationCache
    from transformer_lens.model_bridge import TransformerBridge as Model
else:  # TransformerLens is imported when a model is loaded, not with this module (1.3 s the page need not wait for)
    Model = "TransformerBridge"
DEMO = "demo"  # load_model(DEMO): the small model trained by demo_model/train.py, shipped in the repository
DEMO_DIR = Path(__file__).resolve().parent.parent / "demo_model" / "weights"


class ModelLoadError(RuntimeError):
    """A model could not be loaded; the message says why and what to do."""


def default_device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


@functools.lru_cache(maxsize=4)
def _load_cached(name_or_path: str, device: str) -> Model:
    if os.path.isdir(name_or_path):
        return _load_local(name_or_path, device)
    if _path_like(name_or_path):
        raise ModelLoadError(
            f"{name_or_path} is neither a directory nor a model name the Hugging Face Hub could have. Give the path of a local "
            "model directory (config.json, weights and tokenizer files), or a model name such as 'gpt2'."
        )
    return _load_hub(name_or_path, device)


def _path_like(name: str) -> bool:
    """Not a name the Hub could have ('gpt2', 'openai-community/gpt2'): a path, or a typo (huggingface_hub's own check)."""
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    try:
        validate_repo_id(name)
    except HFValidationError:
        return True
    return False


def load_model(name_or_path: str = DEFAULTS.model_name, device: str | None = None) -> Model:
    """Load a model once per process (later calls return the same object).

    `name_or_path` is a model name TransformerLens 4 supports (e.g. "gpt2") or a local
    Hugging Face model directory (config.json, weights and tokenizer files).
    Raises ModelLoadError with an actionable message when that is impossible.
    """
    if not isinstance(name_or_path, str) or not name_or_path.strip():
        raise ModelLoadError("Give a model name such as 'gpt2' or a path to a model directory.")
    return _load_cached(model_key(name_or_path), device or default_device())


def model_key(name_or_path: str) -> str:
    """What load_model knows a model by: the name, or a directory's full path (the demo model's too)."""
    key = os.path.expanduser(name_or_path.strip())
    if key == DEMO:
        key = str(DEMO_DIR)
    return str(Path(key).resolve()) if os.path.isdir(key) else key


def load_recorded(name_or_path: str, directory: str, device: str | None = None) -> Model:
    """load_model(name_or_path) as it was before: from `directory`, the folder an earlier load read
    (`loaded_from`): a Hub name from that snapshot of the Hub cache, even if the cache has a newer one."""
    key = model_key(name_or_path)
    if os.path.isdir(key):
        return load_model(key, device)  # a local directory is itself the folder
    from transformer_lens.tools.model_registry.registry_io import resolve_model_alias

    try:
        return _load_local_snapshot(resolve_model_alias(key) or key, directory, device or default_device())
    except (OSError, ValueError) as err:
        raise ModelLoadError(f"Could not load '{key}' from {directory}: {err}") from err


def load_with_fallback(name_or_path: str = DEFAULTS.model_name, default: str = DEFAULTS.model_name) -> tuple[Model, str | None]:
    """The default model, or the bundled demo model when the default cannot be loaded.

    Returns (model, notice): notice is None when `name_or_path` loaded, else plain text (no markup)
    saying what happened and how to get the real model. Only the `default` name falls back: a model
    the user named explicitly that fails to load is an error.
    """
    try:
        return load_model(name_or_path), None
    except ModelLoadError as err:
        if name_or_path != default:
            raise
        notice = f"Running CircuitBreaker's small bundled demo model, because {name_or_path} could not be loaded: {err}"
        return load_model(DEMO), notice


def describe_source(name_or_path: str) -> str:
    """Where load_model(name_or_path) will take the weights from, in words (for start-up messages)."""
    key = name_or_path.strip() if isinstance(name_or_path, str) else ""
    if key == DEMO:
        return "the bundled demo model"
    if os.path.isdir(key) or _path_like(key):
        return f"the local directory {key}"
    from huggingface_hub import constants

    if cached_source(key) is not None:
        return "the local Hugging Face cache"
    if constants.HF_HUB_OFFLINE:
        return "the Hugging Face cache (offline: HF_HUB_OFFLINE is set)"
    return f"the Hugging Face Hub ({constants.ENDPOINT}), downloading on this first start (about 550 MB for GPT-2 Small)"


def cached_source(name_or_path: str) -> tuple[str, str] | None:
    """(the name the loaded model will carry as cfg.model_name, the folder of its files) where load_model(name_or_path)
    would read files already here (a local model directory, or a snapshot in the Hub cache); None where it would
    download them first (or fail)."""
    if not isinstance(name_or_path, str) or not name_or_path.strip():
        return None
    key = model_key(name_or_path)
    if os.path.isdir(key):
        return key, key
    from transformer_lens.tools.model_registry.registry_io import resolve_model_alias

    name = resolve_model_alias(key) or key
    snapshot = _cached_snapshot(name)
    return None if snapshot is None else (name, snapshot)


def loaded_from(model: Model) -> str | None:
    """The directory the model's weights were read from (a local model directory, or the Hub cache's
    snapshot), or None for a model not loaded by load_model."""
    return getattr(model, "_circuitbreaker_source", None)


def _set_source(model: Model, directory: str | None) -> Model:
    model._circuitbreaker_source = None if directory is None else str(Path(directory).resolve())
    return model


def model_label(model: Model) -> str:
    """A short human name: "gpt2", a local directory's name, or "the demo model"."""
    name = str(model.cfg.model_name)
    if Path(name) == DEMO_DIR:
        return "the CircuitBreaker demo model"
    return Path(name).name if os.path.isdir(name) else name


def _boot(name: str, hf_model, tokenizer, device: str) -> Model:
    from transformer_lens.model_bridge import TransformerBridge

    hf_model = hf_model.to(device).eval()
    bridge = TransformerBridge.boot_transformers(
        name, hf_model=hf_model, tokenizer=tokenizer, device=device
    )
    return _process(bridge)


def _process(bridge: Model) -> Model:
    """TransformerLens's weight processing (folded LayerNorms, centred weights), then what it left of
    the loaded weights copied into the process's own memory: transformers maps the weights file, and
    the tensors processing does not replace (GPT-2's joined q/k/v weights) would keep the whole file
    mapped, about 470 MB resident for GPT-2 Small beside the processed copies. (Copying every weight
    before processing lets the file go too, but makes processing 0.6 s slower.) Last, the forward pass's
    products go to oneDNN where a fixed prompt's logits stay as they were and it runs faster there
    (core.products.route_products: twice torch's rate on AMD processors; slower on an Intel Xeon)."""
    loaded = {tensor.untyped_storage().data_ptr() for tensor in _tensors(bridge)}
    bridge.enable_compatibility_mode(disable_warnings=True)
    copies = {}  # each storage copied once: tensors that shared one (views, tied weights) still share it
    with torch.no_grad():
        for tensor in _tensors(bridge):
            storage = tensor.untyped_storage()
            if tensor.device.type == "cpu" and storage.data_ptr() in loaded:
                copy = copies.setdefault(storage.data_ptr(), storage.clone())
                tensor.data = torch.tensor([], dtype=tensor.dtype).set_(copy, tensor.storage_offset(), tensor.size(), tensor.stride())
    bridge.eval()
    probe = fixed_prompt(bridge)
    products.route_products(bridge, lambda: bridge(probe))
    return bridge


def fixed_prompt(model: Model) -> Int[Tensor, "1 pos"]:
    """16 fixed token ids (fewer if the context is shorter), spread over the vocabulary: the prompt on which a fast
    path is checked against the model once (its products' routing here, the fast engine in core.patching.exact)."""
    return (torch.arange(1, 17, device=model.cfg.device) * 997 % model.cfg.d_vocab)[None, : model.cfg.n_ctx]


def _tensors(module: torch.nn.Module) -> list[Tensor]:
    return [*module.parameters(), *module.buffers()]


UNREADABLE = (OSError, ValueError, SafetensorError)  # files that are missing, malformed, or not weights at all


def _load_local(directory: str, device: str) -> Model:
    missing = [f for f in ("config.json",) if not os.path.exists(os.path.join(directory, f))]
    if missing:
        raise ModelLoadError(
            f"{directory} is not a Hugging Face model directory: it has no config.json. "
            "Save one with model.save_pretrained(dir) and tokenizer.save_pretrained(dir)."
        )
    hf_model, tokenizer = _read(
        directory, lambda err: f"Could not load the model in {directory}: {err}. The directory needs config.json, the weights (model.safetensors) "
        "and the tokenizer files."
    )
    return _set_source(_boot(directory, hf_model, tokenizer, device), directory)


def _read(directory: str, failure: Callable[[Exception], str]):
    """(the transformers model, its tokenizer) from the files in `directory`, or ModelLoadError(failure(reason))."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    try:
        return AutoModelForCausalLM.from_pretrained(directory, local_files_only=True), AutoTokenizer.from_pretrained(directory, local_files_only=True)
    except UNREADABLE as err:
        raise ModelLoadError(failure(err)) from err


def _cached_snapshot(repo_id: str) -> str | None:
    """The local snapshot directory of a Hub model already downloaded, if there is one."""
    from huggingface_hub import try_to_load_from_cache

    if _path_like(repo_id):
        return None
    config = try_to_load_from_cache(repo_id, "config.json")
    if not isinstance(config, str):
        return None
    snapshot = os.path.dirname(config)
    has_weights = any(
        os.path.exists(os.path.join(snapshot, f)) for f in ("model.safetensors", "pytorch_model.bin")
    )
    return snapshot if has_weights else None


def _hub_reachable() -> bool:
    import requests
    from huggingface_hub import constants

    if constants.HF_HUB_OFFLINE:
        return False
    try:
        requests.head(constants.ENDPOINT, timeout=LIMITS.hub_timeout_s)
    except requests.RequestException:
        return False
    return True


def _load_hub(name: str, device: str) -> Model:
    from transformer_lens.tools.model_registry.registry_io import resolve_model_alias

    name = resolve_model_alias(name) or name  # e.g. TransformerLens's old "gpt2-small" -> "gpt2"
    snapshot = _cached_snapshot(name)
    if snapshot is not None:
        return _load_local_snapshot(name, snapshot, device)
    if not _hub_reachable():
        raise ModelLoadError(
            f"Cannot load '{name}': the Hugging Face Hub cannot be reached and the model is not "
            "in the local cache. Connect to the internet once so it can be downloaded, or pass "
            "the path of a local model directory (e.g. --model /path/to/gpt2)."
        )
    try:
        from transformer_lens.model_bridge import TransformerBridge

        bridge = TransformerBridge.boot_transformers(name, device=device)
    except UNREADABLE as err:
        raise ModelLoadError(
            f"Cannot load '{name}' from the Hugging Face Hub: {err}. "
            "Check the model name (e.g. 'gpt2') or pass a local model directory."
        ) from err
    return _set_source(_process(bridge), _cached_snapshot(name))


def _load_local_snapshot(name: str, snapshot: str, device: str) -> Model:
    hf_model, tokenizer = _read(
        snapshot, lambda err: f"Could not load '{name}' from the Hugging Face cache ({snapshot}): {err}. Delete that folder so that "
        "the next start downloads it again, or pass a local model directory (--model /path/to/dir)."
    )
    bridge = _boot(snapshot, hf_model, tokenizer, device)
    bridge.cfg.model_name = name  # the name the user asked for, not the cache's snapshot directory
    return _set_source(bridge, snapshot)


# --- text <-> tokens -----------------------------------------------------------------


def to_tokens(model: Model, prompt: str, max_tokens: int | None = None, what: str = "The prompt") -> Int[Tensor, "1 pos"]:
    """Tokenize a prompt with the model's BOS token in front, or raise ValueError.

    At most `max_tokens` tokens (default LIMITS.max_prompt_tokens), never more than the model's
    context; text longer than LIMITS.max_prompt_chars is refused before tokenizing."""
    if not isinstance(prompt, str):
        raise ValueError(f"{what} must be text, got {type(prompt).__name__}.")
    if not prompt.strip():
        raise ValueError(f"{what} is empty: type some text to run the model on.")
    limit = min(max_tokens or LIMITS.max_prompt_tokens, model.cfg.n_ctx)
    if len(prompt) > LIMITS.max_prompt_chars:
        raise ValueError(
            f"{what} is {len(prompt):,} characters long; the limit is {LIMITS.max_prompt_chars:,} characters "
            f"(and {limit} tokens): shorten it."
        )
    tokens = model.to_tokens(prompt, prepend_bos=True, truncate=False)
    _check_known_words(model, prompt, tokens)
    if tokens.shape[-1] > limit:
        raise ValueError(
            f"{what} is {tokens.shape[-1]} tokens long (with BOS); the limit here is {limit} tokens: shorten it."
        )
    return tokens


def short(text: str, limit: int = 40) -> str:
    """repr() of text, cut to `limit` characters, for error messages."""
    return repr(text) if len(text) <= limit else repr(text[:limit]) + f"... ({len(text):,} characters)"


def _unknown_id(model: Model) -> int | None:
    """The id of a real "unknown word" token (GPT-2 has none: its unk is its BOS/EOS)."""
    unk = model.tokenizer.unk_token_id
    return None if unk is None or unk == model.tokenizer.bos_token_id else unk


def _check_known_words(model: Model, text: str, ids) -> None:
    unk = _unknown_id(model)
    if unk is None or unk not in ids:
        return
    pre = model.tokenizer.backend_tokenizer.pre_tokenizer
    vocab = model.tokenizer.get_vocab()
    words = [piece for piece, _ in pre.pre_tokenize_str(text)] if pre is not None else text.split()
    unknown = list(dict.fromkeys(model.tokenizer.convert_tokens_to_string([w]) for w in words if w not in vocab))
    listed = ", ".join(short(w) for w in unknown[:5]) + (f" and {len(unknown) - 5} more" if len(unknown) > 5 else "")
    raise ValueError(
        f"This model's vocabulary has no {listed}: "
        "use words it knows (the demo model knows the words of its examples; see the README)."
    )


def str_tokens(model: Model, tokens: Int[Tensor, "1 pos"]) -> list[str]:
    return [model.tokenizer.decode([int(t)]) for t in tokens.reshape(-1)]


def single_token_id(model: Model, text: str, role: str = "target") -> int:
    """The id of `text` if it is exactly one known token, else a ValueError saying how it splits."""
    noun = role if role.endswith("token") else f"{role} token"  # "target token", "competing token"
    if not isinstance(text, str):
        raise ValueError(f"The {noun} must be text, got {type(text).__name__}.")
    if text == "":
        raise ValueError(f"The {noun} is empty: give a single token such as ' Paris'.")
    if len(text) > LIMITS.max_token_chars:
        raise ValueError(f"The {role} must be a single token, got {short(text)}: pick one word.")
    ids = model.tokenizer.encode(text, add_special_tokens=False)
    unk = _unknown_id(model)
    if len(ids) == 1 and ids[0] != unk:
        return int(ids[0])
    if unk in ids:
        message = f"The {role} {short(text)} is not in this model's vocabulary"
    else:
        pieces = [model.tokenizer.decode([i]) for i in ids]
        shown = repr(pieces[:8])[:-1] + (", ...]" if len(pieces) > 8 else "]")
        message = f"The {role} must be a single token, got {short(text)} -> {shown}"
    spaced = model.tokenizer.encode(" " + text, add_special_tokens=False)
    if not text.startswith(" ") and len(spaced) == 1 and spaced[0] != unk:
        message += f"; did you mean {' ' + text!r}?"
    else:
        message += "; pick a word that is one token (most common words with a leading space are)."
    raise ValueError(message)


def check_int(value, name: str, low: int, high: int) -> int:
    """`value` as an int in [low, high], or a ValueError naming the allowed range."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value != int(value):
        raise ValueError(f"{name} must be a whole number between {low} and {high}, got {value!r}.")
    if not low <= int(value) <= high:
        raise ValueError(f"{name} must be between {low} and {high}, got {value!r}.")
    return int(value)


def run_cached(model: Model, tokens: Tensor, names, **kwargs):
    """One forward pass caching only the hooks a technique needs: (logits, ActivationCache). `kwargs` go
    to the model's forward (e.g. Hugging Face's `logits_to_keep`)."""
    with torch.no_grad():
        return model.run_with_cache(tokens, names_filter=names, **kwargs)


Names = frozenset[str]  # the activations a forward pass caches, by TransformerLens's hook names
NO_HOOKS: Names = frozenset()  # a technique that reads only the logits


FORKING_FLAGS = ("use_attn_result", "use_attn_in", "use_hook_mlp_in", "use_split_qkv_input")  # TransformerLens settings that fork a pass per head


def plain(model: Model) -> bool:
    """Whether a pass run now would be the model's own plain pass: no TransformerLens hook on it
    (run_with_hooks, run_with_cache, hooks() and add_hook all put theirs on its hook points), and none
    of the settings that fork its pass per head switched on (FORKING_FLAGS: path patching's hooks on
    the split q/k/v inputs, for one, turn use_split_qkv_input on around their runs)."""
    if any(getattr(model.cfg, flag, False) for flag in FORKING_FLAGS):
        return False
    return not any(point.fwd_hooks or point.bwd_hooks for point in model.hook_dict.values())


@dataclass(frozen=True)
class PromptRun:
    """One forward pass over one prompt: its tokens, logits, and the activations its readers asked for.
    The logits are the final position's only (readers read `logits[:, -1]`; unembedding every position
    cost a tenth of a short prompt's pass)."""

    tokens: Int[Tensor, "1 pos"]
    logits: Float[Tensor, "1 pos_or_1 vocab"]
    cache: ActivationCache


@dataclass(frozen=True)
class PromptReader:
    """How a technique reads one forward pass over a prompt, so that several can share one pass.
    `prepare(model, *inputs)` checks the technique's other inputs and returns (the names of the hooks
    it reads, what `read` needs); `read(model, run, prepared)` computes its result from the `PromptRun`.
    `hooks(model)`, where the hooks it reads do not depend on its inputs: then its inputs may wait for
    the results of the readers before it in the same pass (read_prompt)."""

    prepare: Callable[..., tuple[Names, Any]]
    read: Callable[[Model, PromptRun, Any], Any]
    hooks: Callable[[Model], Names] | None = None


Request = tuple[PromptReader, "tuple | Callable[[list], tuple]"]  # (reader, its inputs or a function of earlier results)
_QUERY_KEY_HOOKS = ("hook_pattern", "hook_attn_scores")  # [batch, head, dest pos, src pos]; every other hook is [batch, pos, ...]


@dataclass(frozen=True)
class PromptJob:
    """One call of a technique that reads one forward pass over its prompt: the prompt and its (reader,
    inputs) requests. The call returns the one request's result, or all of them as a tuple (always a
    tuple with `every`)."""

    prompt: str
    requests: tuple[Request, ...]
    every: bool = False


def one_pass(describe: Callable[..., PromptJob]) -> Callable:
    """A technique written as `describe(model, *inputs) -> PromptJob` (it checks the inputs that need no
    pass and says what to read). Calling the decorated function runs that job alone and returns its
    result; its `.job` is `describe`, so a runner can answer many users' calls from one batched pass
    (read_prompts)."""

    @functools.wraps(describe)
    def technique(model: Model, *args, **kwargs):
        return _alone(model, functools.partial(describe, model, *args, **kwargs))

    technique.job = describe
    return technique


def read_prompt(model: Model, prompt: str, *requests: Request) -> list:
    """One forward pass over `prompt` answers every (reader, inputs) request, in order; it caches the
    union of the hooks they read. The prompt is checked first, then each request's inputs. A request's
    inputs may be a function of the earlier requests' results (e.g. the top prediction as the target),
    for a reader with `hooks`: those inputs are checked after the pass."""
    return list(_alone(model, lambda: PromptJob(prompt, requests, every=True)))


def _alone(model: Model, job: Callable[[], PromptJob]):
    """One job's result from its own pass (read_prompts), or the exception it raised, raised."""
    (outcome,) = read_prompts(model, [job])
    if isinstance(outcome, Exception):
        raise outcome
    return outcome


def read_prompts(model: Model, jobs: list[Callable[[], PromptJob]], max_tokens: int = DEFAULTS.tokens_per_forward) -> list:
    """Every job's result, or the exception it raised: a bad input fails its own job only. `job()` checks
    its inputs and describes its pass (it tokenizes, so it is called here, under the caller's lock).
    One job is one forward pass over its prompt. Several share passes: sorted by length, as many as fit
    in `max_tokens` padded tokens per pass, each padded on the right to the longest. Causal attention
    never reads the padding, so every real position is computed as in a pass over its prompt alone, up to
    float32 rounding (about 1e-6: the batched products add in another order)."""
    outcomes: list = [None] * len(jobs)
    plans = []
    for index, job in enumerate(jobs):
        try:
            plans.append((index, *_plan(model, job())))
        except Exception as err:  # noqa: BLE001  (handed to the job's caller, who raises it)
            outcomes[index] = err
    plans.sort(key=lambda plan: plan[2].shape[-1])
    while plans:
        count = 1
        while count < len(plans) and (count + 1) * plans[count][2].shape[-1] <= max_tokens:
            count += 1
        group, plans = plans[:count], plans[count:]
        try:
            runs = _forward(model, [plan[2] for plan in group], [plan[4] for plan in group])
        except Exception as err:  # noqa: BLE001  (this pass's jobs fail with it; the other passes' stand)
            runs = [err] * len(group)
        for (index, job, tokens, prepared, _), run in zip(group, runs):
            try:
                outcomes[index] = run if isinstance(run, Exception) else _read_job(model, job, run, prepared)
            except Exception as err:  # noqa: BLE001
                outcomes[index] = err
    return outcomes


def _plan(model: Model, job: PromptJob):
    """(job, tokens, each request's prepared inputs or None (they wait for earlier results), the hooks it reads)."""
    tokens = to_tokens(model, job.prompt)
    prepared = [None if callable(inputs) else reader.prepare(model, *inputs) for reader, inputs in job.requests]
    hooks = [reader.hooks(model) if ready is None else ready[0] for (reader, _), ready in zip(job.requests, prepared)]
    return job, tokens, prepared, hooks


def _forward(model: Model, tokens: list[Tensor], hooks: list[list[Names]]) -> list[PromptRun]:
    """One pass over every prompt (one prompt: its own pass, unpadded), caching the union of the hooks read
    and unembedding the final positions only."""
    wanted = frozenset().union(*(names for job_hooks in hooks for names in job_hooks))
    longest = max(t.shape[-1] for t in tokens)
    batch = torch.full((len(tokens), longest), int(tokens[0][0, 0]), dtype=tokens[0].dtype, device=tokens[0].device)
    for row, t in enumerate(tokens):
        batch[row, : t.shape[-1]] = t[0]  # the rest is padding (BOS), after the prompt: never attended to
    finals = sorted({t.shape[-1] - 1 for t in tokens})  # readers read the final position's logits only
    logits, cache = prompt_pass(model, batch, wanted, finals)
    if logits.shape[1] != len(finals):  # the forward ignored logits_to_keep: it gave every position's
        finals = list(range(logits.shape[1]))
    runs = []
    for row, t in enumerate(tokens):
        n, final = t.shape[-1], finals.index(t.shape[-1] - 1)

        def cut(name: str, value: Tensor) -> Tensor:
            rows = value[row : row + 1] if value.shape[0] == len(tokens) else value  # a batch axis of 1 (broadcast): shared
            return rows[:, :, :n, :n] if name.endswith(_QUERY_KEY_HOOKS) else rows[:, :n]

        cut_cache = type(cache)({name: cut(name, value) for name, value in cache.items()}, model)
        runs.append(PromptRun(t, logits[row : row + 1, final : final + 1], cut_cache))
    return runs


def prompt_pass(model: Model, tokens: Int[Tensor, "batch pos"], names: Names, positions: list[int]) -> tuple[Tensor, ActivationCache]:
    """One forward pass: the logits at `positions` (or, for a model whose forward cannot keep only some, at
    every position) and the activations `names`. On the model's fast engine where it gives them all (the plain
    tensor-algebra model of core.patching.fast, checked against the model's own cache the first time), else
    through the model's hooks."""
    from core.patching.exact import prompt_engine  # here: core.patching builds on this module

    engine = prompt_engine(model, names)
    if engine is not None:
        from transformer_lens import ActivationCache

        with torch.no_grad():
            logits, cache = engine.run_with_cache(tokens, names, positions)
        return logits, ActivationCache(cache, model)
    return keeping_logits(functools.partial(run_cached, model, tokens, names.__contains__), torch.tensor(positions, device=tokens.device))


def keeping_logits(forward: Callable, keep: int | Tensor):
    """`forward(logits_to_keep=keep)`: the model unembeds only those positions (Hugging Face's `logits_to_keep`:
    the last `keep`, or the positions listed), or, for a model whose forward has no such argument, `forward()`
    (every position's logits)."""
    try:
        return forward(logits_to_keep=keep)
    except TypeError as err:
        if "logits_to_keep" not in str(err):
            raise
        return forward()


def _read_job(model: Model, job: PromptJob, run: PromptRun, prepared: list):
    results: list = []
    for (reader, inputs), ready in zip(job.requests, prepared):
        _, value = reader.prepare(model, *inputs(results)) if ready is None else ready
        results.append(reader.read(model, run, value))
    return results[0] if len(results) == 1 and not job.every else tuple(results)
