"""Model loading and tokenization: local directories, the offline Hub path, bad text."""

from __future__ import annotations

import os
from pathlib import Path

import huggingface_hub.constants
import pytest
import torch

from core import ModelLoadError, load_model, save_random_gpt2, single_token_id, to_tokens
from core.model import str_tokens


def test_local_directory_loads_in_compatibility_mode(tiny_model):
    assert tiny_model.cfg.n_layers == 2 and tiny_model.cfg.n_heads == 4
    assert tiny_model.compatibility_mode
    # fold_ln + centring: the unembedding is centred over d_model, as HookedTransformer had it
    assert torch.allclose(tiny_model.W_U.mean(0).cpu(), torch.zeros(tiny_model.cfg.d_vocab), atol=1e-5)


def test_loading_is_cached_one_object_per_process(tiny_model):
    # (the cache keeps the 4 most recent models, so compare fresh loads, not the session fixture)
    directory = tiny_model.cfg.model_name
    model = load_model(directory)
    assert load_model(directory) is model
    assert load_model(directory + "/") is model


@pytest.mark.skipif(not os.path.exists("/proc/self/maps"), reason="reads Linux's list of mapped files")
def test_a_loaded_model_lets_its_weights_file_go(tiny_model):
    """transformers maps the weights file into memory; the loaded model holds its own copies, so no
    tensor keeps the file mapped (for GPT-2 Small that was about 470 MB resident beside them)."""
    from transformers import AutoModelForCausalLM

    weights = os.path.realpath(os.path.join(tiny_model.cfg.model_name, "model.safetensors"))

    def mapped() -> bool:
        with open("/proc/self/maps") as maps:
            return weights in maps.read()

    assert not mapped()
    loaded = AutoModelForCausalLM.from_pretrained(tiny_model.cfg.model_name)  # the control: transformers does map it
    assert mapped()
    del loaded


def test_matches_hugging_face_model_up_to_logit_centring(gpt2_shaped):
    """Folding and centring change logits by a per-position constant only: log-probs are equal."""
    from transformers import AutoModelForCausalLM

    hf = AutoModelForCausalLM.from_pretrained(gpt2_shaped.cfg.model_name, attn_implementation="eager").eval()
    tokens = to_tokens(gpt2_shaped, "When John and Mary went to the store")
    with torch.no_grad():
        ours = torch.log_softmax(gpt2_shaped(tokens), -1).cpu()
        theirs = torch.log_softmax(hf(tokens.cpu()).logits, -1)
    torch.testing.assert_close(ours, theirs, atol=1e-4, rtol=0)


def test_a_model_from_the_hub_cache_keeps_its_hub_name_and_its_cached_results(monkeypatch, tmp_path):
    """A restart loads GPT-2 from the Hub's cache (a snapshot directory named by a commit hash): the
    model is still called by the name the user asked for, and the results cache still hits, because
    its key depends on the weights and code, not on where the weights were read from."""
    import shutil

    from serving.runner import model_fingerprint

    source = save_random_gpt2(tmp_path / "source", n_layers=1, n_heads=2, d_model=16, n_ctx=16, seed=3)
    snapshot = tmp_path / "hub" / "models--circuitbreaker-test--cached" / "snapshots" / ("a" * 40)
    shutil.copytree(source, snapshot)
    (snapshot.parent.parent / "refs").mkdir()
    (snapshot.parent.parent / "refs" / "main").write_text("a" * 40)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setattr(huggingface_hub.constants, "ENDPOINT", "http://127.0.0.1:9")  # never asked

    from_cache = load_model("circuitbreaker-test/cached")
    assert from_cache.cfg.model_name == "circuitbreaker-test/cached"
    assert model_fingerprint(from_cache) == model_fingerprint(load_model(source))


def test_directory_without_config_is_a_clear_error(tmp_path):
    with pytest.raises(ModelLoadError, match="no config.json"):
        load_model(str(tmp_path))


def test_a_path_that_is_not_a_directory_is_a_clear_error(tmp_path):
    for path in (tmp_path / "gone", tmp_path / "gone" / "deeper", "./not-here", "~/not-here"):  # not sent to the Hub as a model name
        with pytest.raises(ModelLoadError, match="is neither a directory nor a model name the Hugging Face Hub could have"):
            load_model(str(path))
    (tmp_path / "file.txt").write_text("a file")
    with pytest.raises(ModelLoadError, match="is neither a directory"):
        load_model(str(tmp_path / "file.txt"))
    for typo in ("mymodel/", "models/my gpt2", "a..b"):  # not sent to the Hub either: it could not have them
        with pytest.raises(ModelLoadError, match="is neither a directory"):
            load_model(typo)
    with pytest.raises(ModelLoadError, match="Could not load the model in .*: Error while deserializing"):  # a damaged weights file
        directory = save_random_gpt2(tmp_path / "damaged", n_layers=1, n_heads=2, d_model=32, n_ctx=16, seed=2)
        (Path(directory) / "model.safetensors").write_bytes(b"not weights")
        load_model(directory)


def test_unreachable_hub_fails_at_once_with_advice(monkeypatch):
    # An endpoint on a closed local port: refused immediately, like a machine with no network.
    monkeypatch.setattr(huggingface_hub.constants, "ENDPOINT", "http://127.0.0.1:9")
    with pytest.raises(ModelLoadError, match="cannot be reached.*local model directory"):
        load_model("circuitbreaker-test/not-cached-anywhere")


def test_prompt_gets_bos_and_labels(tiny_model):
    tokens = to_tokens(tiny_model, "When John and Mary")
    assert str_tokens(tiny_model, tokens) == ["<|endoftext|>", "When", " John", " and", " Mary"]


@pytest.mark.parametrize("prompt", ["", "   ", "\n\t "])
def test_empty_prompt_is_rejected(tiny_model, prompt):
    with pytest.raises(ValueError, match="prompt is empty"):
        to_tokens(tiny_model, prompt)


def test_prompt_longer_than_context_is_rejected(tiny_model):
    with pytest.raises(ValueError, match=r"tokens long .* limit here is 64 tokens"):
        to_tokens(tiny_model, " word" * 64)


def test_multi_token_target_says_how_it_splits_and_suggests_a_space(tiny_model):
    with pytest.raises(ValueError, match=r"'Berlin' -> \['Ber', 'lin'\]; did you mean ' Berlin'\?"):
        single_token_id(tiny_model, "Berlin")
    with pytest.raises(ValueError, match=r"' Eiffel' -> \[' E', 'iff', 'el'\]"):
        single_token_id(tiny_model, " Eiffel")
    with pytest.raises(ValueError, match="empty"):
        single_token_id(tiny_model, "")
    assert single_token_id(tiny_model, " Paris") == 6342
