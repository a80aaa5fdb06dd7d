"""A restart serves its page before the model loads (serving/restart.py): the page comes from the last
start's record and the example cache, the model loads behind it and must be the recorded one."""

from __future__ import annotations

import json
import os
import time
import urllib.request
from pathlib import Path
from types import SimpleNamespace

import gradio as gr
import pytest
from gradio_client import Client

import app
import serving.restart as restart
from core import ModelLoadError, load_model, predict, save_random_gpt2
from core.model import default_device, load_recorded, loaded_from
from serving.runner import ModelChanged, NotCached, Runner
from tests.conftest import IOI_CLEAN, assert_same_answer, free_port
from tests.test_app import _run_app, wait_for_page
from ui.common import user_errors
from ui.handlers import example_rows

DEVICE = default_device()
NEW_PROMPT = "A prompt no example has, so only the model can answer it:"


@pytest.fixture
def started(tmp_path):
    """A model directory of its own, started once as app.main does: (directory, model, cache folder)."""
    directory = save_random_gpt2(tmp_path / "model", n_layers=2, n_heads=4, d_model=64, n_ctx=64, seed=11)
    model, cache = load_model(directory), tmp_path / "cache"
    runner = Runner(model, cache_dir=cache)
    app.build_demo(model, runner=runner, warm=False)  # each tab's first example, computed and stored
    restart.remember(cache, directory, DEVICE, model, runner.fingerprint)
    return directory, model, cache


def test_a_restart_serves_its_page_and_cached_examples_without_the_model_then_loads_it_for_new_work(started):
    directory, model, cache = started
    assert loaded_from(model) == str(Path(directory).resolve())
    record = restart.recall(cache, directory, DEVICE)
    assert record is not None and record.cfg["n_layers"] == 2 and record.cfg["n_heads"] == 4
    loads = []

    def loader():
        loads.append(directory)
        return load_model(directory)

    runner = Runner(loader=loader, fingerprint=record.fingerprint, cache_dir=cache)
    demo = app.build_demo(record.sketch(), runner=runner, warm=False)
    assert loads == [] and not runner.loaded  # the page, first examples included, without the model
    header = next(b.value for b in demo.blocks.values() if getattr(b, "value", None) and "think:" in str(b.value))
    assert f"Watch **{Path(directory).name}** (2 layers x 4 heads)" in header
    port = free_port()
    demo.launch(prevent_thread_lock=True, server_name="127.0.0.1", server_port=port, quiet=True, **app.launch_options())
    try:
        client = Client(f"http://127.0.0.1:{port}/", verbose=False)
        first = example_rows(record.sketch())["explorer"][1][0]  # [prompt, target, competing, layer, head], fitted to the model
        assert client.predict(*first[:4], api_name="/explore") and loads == []  # an example on disk needs no model
        assert client.predict(NEW_PROMPT, 3, api_name="/predict") == predict(model, NEW_PROMPT, 3).to_dict()
        assert loads == [directory] and runner.loaded  # loaded once, by the first request that needed it
        assert client.predict(IOI_CLEAN, 2, api_name="/predict") == predict(model, IOI_CLEAN, 2).to_dict()
        assert loads == [directory]
    finally:
        demo.close()


def test_a_record_whose_files_changed_is_not_used(started, tmp_path):
    directory, _, cache = started
    weights = Path(directory) / "model.safetensors"
    os.utime(weights, ns=(weights.stat().st_atime_ns, weights.stat().st_mtime_ns + 1))  # rewritten: a new time
    assert restart.recall(cache, directory, DEVICE) is None
    assert restart.recall(cache, str(tmp_path / "elsewhere"), DEVICE) is None  # no record for another model
    record = restart._path(cache, directory, DEVICE)
    record.write_text("not json")
    assert restart.recall(cache, directory, DEVICE) is None  # unreadable: an ordinary start


def test_a_record_from_other_code_is_not_used(started):
    directory, _, cache = started
    path = restart._path(cache, directory, DEVICE)
    path.write_text(json.dumps(json.loads(path.read_text()) | {"code": "another version"}))
    assert restart.recall(cache, directory, DEVICE) is None  # new code may process the weights differently


def test_a_restart_loads_the_recorded_folder_under_the_name_asked_for(started):
    """A Hub name loads from the snapshot the record names, not from whatever the Hub cache holds now."""
    directory, model, _ = started
    again = load_recorded("gpt2", directory)
    assert again.cfg.model_name == "gpt2" and loaded_from(again) == str(Path(directory).resolve())
    assert predict(again, IOI_CLEAN, 3).to_dict() == predict(model, IOI_CLEAN, 3).to_dict()
    with pytest.raises(ModelLoadError, match="Could not load 'gpt2'"):
        load_recorded("gpt2", str(Path(directory) / "gone"))


def test_a_failed_load_is_not_tried_again_by_every_waiting_request(started):
    directory, _, cache = started
    tries = []

    def loader():
        tries.append(1)
        raise ModelLoadError("the disk is gone")

    runner = Runner(loader=loader, fingerprint="0" * 32, cache_dir=cache)
    for _ in range(3):
        with pytest.raises(ModelLoadError, match="the disk is gone"):
            runner.run(predict, NEW_PROMPT, 3)
    assert tries == [1]
    with pytest.raises(gr.Error, match=r"The model could not be loaded: .*Reload this page in a minute. \(the disk is gone\)"):
        user_errors(lambda: runner.run(predict, NEW_PROMPT, 3))()  # a page's request: a sentence, not a traceback


def test_a_record_is_not_used_once_a_file_is_added(started):
    directory, _, cache = started
    assert restart.recall(cache, directory, DEVICE) is not None
    (Path(directory) / "pytorch_model.bin").write_bytes(b"")  # the loader may now read other weights
    assert restart.recall(cache, directory, DEVICE) is None


def test_a_loaded_model_with_other_weights_than_recorded_answers_nothing(started):
    directory, _, cache = started
    runner = Runner(loader=lambda: load_model(directory), fingerprint="0" * 32, cache_dir=cache)
    with pytest.raises(ModelChanged, match="start the app again"):
        runner.run(predict, NEW_PROMPT, 3)
    assert not runner.loaded
    with pytest.raises(TypeError):
        Runner()  # a model or a loader
    with pytest.raises(TypeError):
        Runner(load_model(directory), fingerprint="0" * 32)  # a loaded model's fingerprint is its own


def _start(directory: str, cache: Path, port: int):
    return _run_app("--model", directory, "--port", str(port), env={"CIRCUITBREAKER_CACHE_DIR": str(cache), "HF_HUB_OFFLINE": "1"})


def _stop(process) -> str:
    process.terminate()
    output, _ = process.communicate(timeout=60)
    return output


def test_python_app_py_restarts_page_first_and_refuses_weights_that_are_not_the_recorded_ones(started, tmp_path):
    directory, model, _ = started
    cache = tmp_path / "app-cache"
    expected = predict(model, NEW_PROMPT, 3).to_dict()
    for start in ("first", "restart"):
        port = free_port()
        process = _start(directory, cache, port)
        try:
            wait_for_page(process, port)
            assert_same_answer(Client(f"http://127.0.0.1:{port}/", verbose=False).predict(NEW_PROMPT, 3, api_name="/predict"), expected)
        finally:
            output = _stop(process)
        ours = [line for line in output.splitlines() if line.startswith("CircuitBreaker:")]
        assert process.returncode == 0 and "Traceback" not in output, output
        if start == "first":  # its files are here: the page first too, its shape from config.json
            assert ours[0].startswith(f"CircuitBreaker: loading {directory} from the local directory") and "behind the page" in ours[0], output
        else:
            assert ours[0].startswith(f"CircuitBreaker: restarting on {directory}"), output
        ready = next(i for i, line in enumerate(ours) if line.startswith("CircuitBreaker: ready in"))
        loaded = next(i for i, line in enumerate(ours) if line.startswith("CircuitBreaker: loaded"))
        assert ready < loaded, output  # the page served before the model was loaded

    path = restart._path(cache, directory, DEVICE)
    path.write_text(json.dumps(json.loads(path.read_text()) | {"fingerprint": "0" * 32}))  # the files look the same, the weights do not
    process = _start(directory, cache, free_port())
    output, _ = process.communicate(timeout=300)
    assert process.returncode != 0 and "start the app again" in output and "Traceback" not in output, output
    assert not path.exists()  # the next start is an ordinary one


def _page(demo) -> list:
    """Every component of a page, in order, with its properties (ids aside: they count up per process)."""
    return [(c["type"], {k: v for k, v in c["props"].items() if k not in ("key", "proxy_url", "component_ids")}) for c in demo.config["components"]]


def test_a_first_start_builds_the_same_page_from_config_json_then_learns_the_weights_fingerprint_when_it_loads(tmp_path):
    """A first start on files already here serves its page before the model loads: the page is drawn from
    config.json (serving.restart.first_sketch) and is the page the loaded model gives; the runner has no
    fingerprint to look results up by until the model loads, then keys them as a loaded model's runner does."""
    directory = save_random_gpt2(tmp_path / "model", n_layers=2, n_heads=4, d_model=64, n_ctx=64, seed=12)
    sketch = restart.first_sketch(directory)
    model = load_model(directory)
    assert vars(sketch.cfg) == {"model_name": str(Path(directory).resolve()), "n_layers": 2, "n_heads": 4, "n_ctx": 64}
    assert restart.sketched(model, sketch) and app.load_sketched(directory, sketch) is model
    other = SimpleNamespace(cfg=SimpleNamespace(**(vars(sketch.cfg) | {"n_ctx": 1024})))
    with pytest.raises(ModelLoadError, match="is not the model its config.json describes"):  # never handed to the page's runner
        app.load_sketched(directory, other)
    loads = []

    def loader():
        loads.append(directory)
        return load_model(directory)

    cache = tmp_path / "cache"
    runner = Runner(loader=loader, cache_dir=cache)
    demo = app.build_demo(sketch, runner=runner, warm="background")
    assert loads == [] and runner.fingerprint is None
    assert _page(demo) == _page(app.build_demo(model, runner=Runner(model, cache_dir=tmp_path / "other"), warm="background"))
    with runner.cached_only(), pytest.raises(NotCached):  # nothing to look up by yet, and nothing loaded for it
        runner.run(predict, IOI_CLEAN, 2, persist=True)
    assert loads == []
    result = runner.run(predict, IOI_CLEAN, 2, persist=True)
    assert loads == [directory] and runner.fingerprint == Runner(model, cache_dir=None).fingerprint
    again = Runner(model, cache_dir=cache)  # the next start, the model loaded: the result stored under the same key
    with again.cached_only():
        assert again.run(predict, IOI_CLEAN, 2, persist=True).to_dict() == result.to_dict()


def test_a_first_sketch_needs_files_that_are_here_and_name_the_models_shape(tmp_path, monkeypatch):
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "empty-hub-cache"))
    assert restart.first_sketch("gpt2") is None  # not downloaded yet: an ordinary start (which may fall back to the demo model)
    assert restart.first_sketch(str(tmp_path / "nowhere")) is None
    odd = tmp_path / "odd"
    odd.mkdir()
    for config in ({"n_layer": 2, "n_head": 4}, {"n_layer": 2, "n_head": "4", "n_positions": 64}, [2, 4, 64]):
        (odd / "config.json").write_text(json.dumps(config))
        assert restart.first_sketch(str(odd)) is None, config
    (odd / "config.json").write_text(json.dumps({"num_hidden_layers": 3, "num_attention_heads": 2, "max_position_embeddings": 128}))
    assert vars(restart.first_sketch(str(odd)).cfg) == {"model_name": str(odd.resolve()), "n_layers": 3, "n_heads": 2, "n_ctx": 128}
    sketch = restart.first_sketch(str(odd))
    assert not restart.sketched(SimpleNamespace(cfg=SimpleNamespace(model_name=str(odd.resolve()), n_layers=3, n_heads=2, n_ctx=64)), sketch)


def _hub_cache(root: Path, damaged: bool) -> None:
    """gpt2 in a Hugging Face cache under `root` (HF_HOME), as a download leaves it: a small random model."""
    snapshot = root / "hub" / "models--gpt2" / "snapshots" / "0123abcd"
    save_random_gpt2(snapshot, n_layers=2, n_heads=4, d_model=64, n_ctx=64, seed=13)
    if damaged:
        (snapshot / "model.safetensors").write_bytes(b"not weights")
    (snapshot.parent.parent / "refs").mkdir()
    (snapshot.parent.parent / "refs" / "main").write_text("0123abcd")


def _first_start_from_the_hub_cache(process) -> tuple[str, list[str]]:
    """Stop the app; (its console, its own lines), checked: a clean stop, and a first start that served its page first."""
    output = _stop(process)
    ours = [line for line in output.splitlines() if line.startswith("CircuitBreaker:")]
    assert process.returncode == 0 and "Traceback" not in output, output
    assert ours[0].startswith("CircuitBreaker: loading gpt2 from the local Hugging Face cache, behind the page"), output
    return output, ours


def test_python_app_py_first_start_on_gpt2_in_the_hub_cache_serves_its_page_then_loads_it(tmp_path):
    _hub_cache(tmp_path / "hf", damaged=False)
    port, cache = free_port(), tmp_path / "cache"
    process = _run_app("--port", str(port), env={"CIRCUITBREAKER_CACHE_DIR": str(cache), "HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf")})
    try:
        wait_for_page(process, port)
        header = json.loads(urllib.request.urlopen(f"http://127.0.0.1:{port}/config", timeout=10).read())["components"][0]["props"]["value"]
        assert "Watch **gpt2** (2 layers x 4 heads)" in header  # from config.json, named as the loaded model is
        assert Client(f"http://127.0.0.1:{port}/", verbose=False).predict(IOI_CLEAN, 2, api_name="/predict")
    finally:
        output, ours = _first_start_from_the_hub_cache(process)
    ready = next(i for i, line in enumerate(ours) if line.startswith("CircuitBreaker: ready in"))
    assert ours[ready + 1].startswith("CircuitBreaker: loaded gpt2 (2 layers x 4 heads)"), output
    record = restart.recall(cache, "gpt2", DEVICE)  # the next start is a restart
    assert record is not None and record.source.endswith("snapshots/0123abcd") and record.cfg["model_name"] == "gpt2"


def test_python_app_py_first_start_on_a_damaged_hub_download_serves_its_page_then_falls_back_to_the_demo_model(tmp_path):
    """gpt2 in the Hub cache, its weights file damaged: the first start serves its page from config.json, the
    model fails to load behind it, and the app starts again the ordinary way, which falls back to the bundled
    demo model and says why, with what to do. No traceback; it stops cleanly."""
    _hub_cache(tmp_path / "hf", damaged=True)
    port = free_port()
    env = {"CIRCUITBREAKER_CACHE_DIR": str(tmp_path / "cache"), "HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf"), "TQDM_DISABLE": "1"}
    process = _run_app("--port", str(port), env=env)
    try:
        wait_for_page(process, port)
        for _ in range(600):  # until the page served again, on the demo model
            try:
                config = json.loads(urllib.request.urlopen(f"http://127.0.0.1:{port}/config", timeout=5).read())
                if any("**demo model**" in str(c.get("props", {}).get("value")) for c in config["components"]):
                    break
            except OSError:
                pass
            time.sleep(0.5)
        else:
            pytest.fail("the page never came back on the demo model")
        assert Client(f"http://127.0.0.1:{port}/", verbose=False).predict(IOI_CLEAN, 2, api_name="/predict")
    finally:
        output, ours = _first_start_from_the_hub_cache(process)
    said = "\n".join(ours)
    assert "the model did not load behind the page (ModelLoadError): starting again, the model first" in said, output
    assert "because gpt2 could not be loaded: Could not load 'gpt2' from the Hugging Face cache" in said and "Delete that folder" in said, output
    assert [line.startswith("CircuitBreaker: ready in") for line in ours].count(True) == 2, output
    assert not list((tmp_path / "cache").glob("starts/*.json"))  # the demo model standing in: no record for a restart
