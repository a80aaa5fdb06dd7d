"""The bundled demo model: its measured behaviour, its vocabulary, and the app's fallback to it."""

from __future__ import annotations

import json
import urllib.request
from pathlib import Path

import pytest

import app
from core import DEFAULTS, ModelLoadError, single_token_id, to_tokens
from core.model import DEMO_DIR, load_with_fallback
from core.runner import Runner
from demo_model.measure import check, measure
from demo_model.train import TrainConfig, train

ROOT = Path(__file__).resolve().parent.parent


def test_committed_model_is_small_and_loads_offline(demo_model):
    size = sum(f.stat().st_size for f in DEMO_DIR.iterdir())
    assert size < 8 * 2**20, f"{size / 2**20:.1f} MB"
    assert demo_model.cfg.n_layers == TrainConfig.n_layers and demo_model.compatibility_mode


@pytest.fixture(scope="module")
def committed_measurement(demo_model):
    return measure(str(DEMO_DIR))


def test_committed_model_has_the_promised_behaviour(committed_measurement):
    assert check(committed_measurement) == []
    assert committed_measurement["ioi_fraction_correct"] > 0.999  # all but at most 3 of the 3,840 prompts


def test_readme_reports_the_committed_models_numbers(committed_measurement):
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    m = committed_measurement
    assert f"{m['ioi_mean_logit_diff']:.2f}" in readme
    assert f"{m['best_induction_score']:.3f}" in readme
    assert f"{m['loss_second_half']:.2f}" in readme


def test_every_example_runs_on_it(demo_model, tmp_path):
    handlers = app.Handlers(Runner(demo_model, cache_dir=None), str(tmp_path))
    rows = app.example_rows(demo_model)
    assert [len(rows[tab][1]) for tab in ("explorer", "contrast")] == [4, 8]
    app.warm_examples(handlers)  # raises on any example the model cannot take


def test_unknown_word_is_named(demo_model):
    with pytest.raises(ValueError, match=r"vocabulary has no ' zebra', ' unicorn'"):
        to_tokens(demo_model, "The zebra and a unicorn")
    with pytest.raises(ValueError, match=r"'Berlin' is not in this model's vocabulary; did you mean ' Berlin'\?"):
        single_token_id(demo_model, "Berlin")
    with pytest.raises(ValueError, match=r"' zebra' is not in this model's vocabulary"):
        single_token_id(demo_model, " zebra")


def test_default_model_falls_back_to_the_demo_model_offline(monkeypatch):
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "ENDPOINT", "http://127.0.0.1:9")
    monkeypatch.setattr("core.model.DEFAULTS", DEFAULTS.__class__(model_name="circuitbreaker-test/not-cached"))
    model, notice = load_with_fallback("circuitbreaker-test/not-cached")
    assert model.cfg.model_name == str(DEMO_DIR) and "demo model" in notice and "--model DIR" in notice
    with pytest.raises(ModelLoadError):  # a model the user named is never silently replaced
        load_with_fallback("circuitbreaker-test/also-not-cached")


def test_python_app_py_offline_starts_on_the_demo_model_and_says_so(tmp_path):
    from tests.test_app import _run_app, free_port, wait_for_page

    port = free_port()
    process = _run_app("--port", str(port), env={"HF_HUB_OFFLINE": "1", "CIRCUITBREAKER_CACHE_DIR": str(tmp_path)})
    try:
        wait_for_page(process, port)
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/config", timeout=10) as response:
            config = json.loads(response.read())
        texts = [c.get("props", {}).get("value") for c in config["components"]]
        assert any(isinstance(t, str) and "demo model" in t and "--model DIR" in t for t in texts)
    finally:
        process.terminate()
        process.wait(timeout=30)


@pytest.mark.slow
def test_retraining_reproduces_the_committed_behaviour(tmp_path):
    """demo_model/train.py from scratch (about 11 minutes on 2 cores): the new model passes the same checks."""
    out = train(TrainConfig(), tmp_path / "retrained", log=lambda line: None)
    m = measure(str(out))
    assert check(m) == []
