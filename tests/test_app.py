"""The app: handlers in-process, a real server called with gradio_client, the real entry point."""

from __future__ import annotations

import concurrent.futures
import dataclasses
import json
import os
import re
import subprocess
import sys
import threading
import time
import urllib.request
import warnings
from pathlib import Path

import gradio as gr
import pytest
from gradio_client import Client
from gradio_client.exceptions import AppError, ValidationError

import app
import ui.common
from core import (
    SWEEPS,
    activation_patching,
    induction_scores,
    plots,
    predict,
)
from core.attribution import input_errors as explorer_errors
from core.config import LIMITS, Limits
from core.contrast import input_errors as pair_errors
from core.edges import input_errors as circuit_errors
from core.induction import input_errors as induction_errors
from core.patching.task import input_errors as task_errors
from core.plots import SPACE
from core.registry import techniques
from core.results import dumps
from examples import EIFFEL
from serving.runner import Runner
from tests.conftest import IOI_CLEAN, IOI_CORRUPTED, assert_same_answer, free_port  # noqa: F401  (free_port: used by other test modules too)
from ui.common import validator
from ui.handlers import Handlers, example_rows

ROOT = Path(__file__).resolve().parent.parent
SHORT_CLEAN, SHORT_CORRUPTED = "When John and Mary went to the store", "When John and Paul went to the store"
TECHNIQUES = techniques()
JSON_ENDPOINTS = {f"/{name}": list(t.result.json_keys()) for name, t in TECHNIQUES.items()}  # one per technique (core.registry)
UI_ENDPOINTS = {"/explore", "/contrast", "/circuit_map"}


def readme_endpoint_table() -> dict[str, tuple[str, list[str]]]:
    """README's JSON endpoint table: api_name -> (its inputs as written, the output keys it names, in order)."""
    rows = [line.split(" | ") for line in (ROOT / "README.md").read_text(encoding="utf-8").splitlines() if line.startswith("| `/")]
    return {row[0].strip("| `"): (row[1], [key for key in re.findall(r"`(\w+)`", row[2]) if key != "true"]) for row in rows}


def declared_inputs(name: str) -> str:
    """A technique's inputs as README's table writes them: `prompt, k=10`."""
    return ", ".join(spec.name if spec.required else f"{spec.name}={json.dumps(spec.default)}" for spec in TECHNIQUES[name].inputs)


def test_every_endpoint_is_documented(client):
    """The server's public endpoints, README's endpoint table (names, inputs and output keys, in order) and
    the load benchmark's endpoint list all agree with the registry."""
    endpoints = client.view_api(return_format="dict", print_info=False)["named_endpoints"]
    assert set(JSON_ENDPOINTS) | UI_ENDPOINTS == set(endpoints)
    assert readme_endpoint_table() == {endpoint: (declared_inputs(endpoint[1:]), keys) for endpoint, keys in JSON_ENDPOINTS.items()}
    from benchmarks.bench_load import ENDPOINTS

    assert sorted(ENDPOINTS) == sorted(endpoints)


def api_calls() -> list[tuple[str, tuple, object]]:
    """Each technique's example request, and the same with each optional token left blank:
    (endpoint, the values sent, a function of the model computing the same in core)."""
    out = []
    for name, t in TECHNIQUES.items():
        blanks = [spec.name for spec in t.inputs if spec.kind == "token" and spec.default == ""]
        for blank in [None, *blanks]:
            sent = t.request({blank: ""} if blank else {})
            out.append((f"/{name}", sent, lambda m, t=t, sent=sent: t.run(m, *t.arguments(sent))))
    return out


CALLS = api_calls()


@pytest.mark.parametrize("endpoint, args, compute", CALLS, ids=[f"{c[0]}-{i}" for i, c in enumerate(CALLS)])
def test_json_endpoints_equal_core(client, demo_model, endpoint, args, compute):
    result = client.predict(*args, api_name=endpoint)
    assert list(result) == JSON_ENDPOINTS[endpoint]
    assert result == compute(demo_model).to_dict()


def test_defaults_of_optional_inputs(client, demo_model):
    assert client.predict(IOI_CLEAN, api_name="/predict") == predict(demo_model, IOI_CLEAN, 10).to_dict()
    assert client.predict(api_name="/induction", seq_len=8) == induction_scores(demo_model, 8, 10, 0).to_dict()
    longest = (demo_model.cfg.n_ctx - 1) // 2  # 50 random tokens twice do not fit the demo model's context: its longest
    assert longest < 50 and client.predict(api_name="/induction") == induction_scores(demo_model, longest, 10, 0).to_dict()


@pytest.mark.parametrize(
    "endpoint, args, message",
    [
        ("/predict", ("   ",), "prompt is empty"),
        ("/predict", (IOI_CLEAN, 0), "k must be between 1 and 100"),
        ("/logit_lens", (IOI_CLEAN, "Berlin"), r"'Berlin' is not in this model's vocabulary; did you mean ' Berlin'\?"),
        ("/logit_lens", ("The zebra", ""), r"vocabulary has no ' zebra'"),
        ("/dla", (IOI_CLEAN, ""), "target token is empty"),
        ("/attention", (IOI_CLEAN, 7), "layer must be between 0 and 4"),
        ("/induction", (1, 2, 0), "seq_len must be between 2 and 31"),
        ("/patching", (IOI_CLEAN, "When John and Mary went", " Mary", " John"), r"clean has 17 .* corrupted has 6"),
        ("/patching", (IOI_CLEAN, IOI_CLEAN, " Mary", " John"), "same logit difference"),
        ("/attribution_patching", (IOI_CLEAN, "When John and Mary went", " Mary", " John"), r"clean has 17 .* corrupted has 6"),
        ("/contrast", (IOI_CLEAN, IOI_CORRUPTED, " Mary", " Mary"), "same token"),
    ],
)
def test_bad_input_reaches_the_client_as_a_clear_message(client, endpoint, args, message):
    with pytest.raises((AppError, ValidationError), match=message):
        client.predict(*args, api_name=endpoint)
    assert client.predict("When John and Mary went", 1, api_name="/predict")["tokens"][-1] == " went"


def test_concurrent_requests_equal_serial_ones(server):
    """Hooks live on the one shared model: requests at the same time, to every endpoint (JSON API
    and UI events), must return exactly what they return one at a time."""
    calls = [
        ("/dla", (SHORT_CLEAN, " Mary", " John")),
        ("/logit_lens", (SHORT_CORRUPTED, " John")),
        ("/attention", (SHORT_CLEAN, 0)),
        ("/patching", (SHORT_CLEAN, SHORT_CORRUPTED, " Mary", " John")),
        ("/attribution_patching", (SHORT_CLEAN, SHORT_CORRUPTED, " Mary", " John")),
        ("/induction", (12, 4, 9)),
        ("/predict", (SHORT_CORRUPTED, 4)),
        ("/explore", (SHORT_CLEAN, " Mary", "", 2, 1)),
        ("/contrast", (SHORT_CLEAN, SHORT_CORRUPTED, " Mary", " John")),
        ("/circuit_map", (9, 2, 5)),
    ]
    distinct = len(calls)
    calls = calls * 3
    serial = [Client(server, verbose=False).predict(*args, api_name=name) for name, args in calls[:distinct]]

    def call(item):
        name, args = item
        return Client(server, verbose=False).predict(*args, api_name=name)

    with concurrent.futures.ThreadPoolExecutor(max_workers=len(calls)) as pool:
        results = list(pool.map(call, calls))
    for i, result in enumerate(results):
        assert result == serial[i % distinct], calls[i][0]


def test_ui_events_return_figures_and_a_download(client):
    top, heatmap, final, dla_heads, dla_parts, head, heads, download = client.predict(
        IOI_CLEAN, "", " John", 1, 2, api_name="/explore"
    )
    assert "Top predictions" in top["plot"] and "layer 1 head 2" in head["plot"]
    assert Path(download).read_text(encoding="utf-8").startswith('{"predictions"')
    status, summary, *figures, download = client.predict(SHORT_CLEAN, SHORT_CORRUPTED, " Mary", " John", api_name="/contrast")
    assert "Done" in status and "clean" in summary and "swing" in summary and "top-10 overlap" in summary
    assert len(figures) == 11 and all(figures)  # lens, 4 exact, 4 approximate, their agreement, DLA vs patching
    saved = json.loads(Path(download).read_text(encoding="utf-8"))
    assert saved["approximate"]["approximate"] is True and list(saved["agreement"]) == list(SWEEPS)
    *figures, heads, download = client.predict(8, 2, 0, api_name="/circuit_map")
    assert len(figures) == 5 and Path(download).exists()


def test_contrast_shows_the_approximate_preview_first_then_exact_beside_it(demo_model, tmp_path):
    handlers = Handlers(Runner(demo_model, cache_dir=None), str(tmp_path))
    preview, final = list(handlers.contrast_steps(IOI_CLEAN, IOI_CORRUPTED, " Mary", " John"))
    assert list(preview) == list(final)  # every output, every step
    assert "approximate preview" in preview["status"] and all(preview[f"exact {name}"] is None for name in SWEEPS)  # exact not there yet
    assert all(preview[f"approximate {name}"].layout.title.text.startswith("APPROXIMATE (attribution patching)") for name in SWEEPS)
    assert all(final[f"exact {name}"].layout.title.text.startswith("Activation patching (exact)") for name in SWEEPS)
    assert all(final[f"approximate {name}"].layout.title.text.startswith("APPROXIMATE (attribution patching)") for name in SWEEPS)
    for name in SWEEPS:
        exact, approximate, first = final[f"exact {name}"], final[f"approximate {name}"], preview[f"approximate {name}"]
        assert approximate.data[0].z.tolist() == first.data[0].z.tolist()  # the preview's numbers, now beside exact
        scale = lambda fig: (fig.layout.coloraxis.cmin, fig.layout.coloraxis.cmax)  # noqa: E731
        assert scale(approximate) == scale(exact) and scale(exact)[0] == -scale(exact)[1]  # one symmetric scale
    assert "| head_out |" in final["summary"] and "slope" in final["summary"] and "Small swing" not in final["summary"]


def test_a_small_swing_is_flagged_as_noise_on_the_page_and_in_the_json(client, demo_model, tmp_path):
    """' store' -> ' park' barely moves the demo model's answer (swing -0.66): normalised scores are noise there."""
    corrupted = IOI_CLEAN.replace(" store", " park")
    exact = client.predict(IOI_CLEAN, corrupted, " Mary", " John", api_name="/patching")
    assert abs(exact["swing"]) < exact["min_swing"] == 1.0 and "read them as noise" in exact["swing_warning"]
    fine = client.predict(IOI_CLEAN, IOI_CORRUPTED, " Mary", " John", api_name="/attribution_patching")
    assert fine["swing"] > 1.0 and fine["swing_warning"] is None
    handlers = Handlers(Runner(demo_model, cache_dir=None), str(tmp_path))
    preview, final = list(handlers.contrast_steps(IOI_CLEAN, corrupted, " Mary", " John"))
    assert "Small swing" in preview["summary"] and "less than 1 logit" in final["summary"]


def test_handlers_in_process_default_the_target_to_the_top_prediction(tiny_model, tmp_path):
    handlers = Handlers(Runner(tiny_model, cache_dir=None), str(tmp_path))
    outputs = handlers.explore(IOI_CLEAN, "", "", 0, 0)
    top = predict(tiny_model, IOI_CLEAN).top_tokens[0]
    assert plots.escape_token(top) in outputs["lens_final"].layout.title.text  # the target the lens follows: the top prediction
    assert outputs["lens_heatmap"].layout.title.text.startswith("Logit lens")


def test_a_prompt_ending_in_a_space_gets_a_hint_and_its_results(demo_model, tmp_path):
    """GPT-2 reads a trailing space as a token of its own, so the predictions are for what follows it: the
    Explorer says so (a warning beside the results, not an error)."""
    handlers = Handlers(Runner(demo_model, cache_dir=None), str(tmp_path))
    with pytest.warns(UserWarning, match="ends with a space"):
        outputs = handlers.explore(EIFFEL + " ", "", "", 0, 0)
    assert SPACE in outputs["predictions"].layout.title.text  # "next token after ␣"
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        handlers.explore(EIFFEL, "", "", 0, 0)  # no hint without one


def test_validators_show_each_message_on_its_field_before_the_run(demo_model, tmp_path):
    """Bad input is caught before the run (so the results shown stay), each message on the field it is about,
    with the exact sentence the run itself would give."""
    handlers = Handlers(Runner(demo_model, cache_dir=None), str(tmp_path))
    contrast = validator(handlers, pair_errors, ["clean_prompt", "corrupted_prompt", "answer", "wrong_answer"])
    checks = contrast(IOI_CLEAN, "When John and Mary went", " Mary", "Berlin")
    assert [c["is_valid"] for c in checks] == [True, False, True, False]
    with pytest.raises(ValueError) as run_error:
        activation_patching(demo_model, IOI_CLEAN, "When John and Mary went", " Mary", " John")
    assert checks[1]["message"] == str(run_error.value) and "did you mean ' Berlin'?" in checks[3]["message"]
    assert all(c["is_valid"] for c in contrast(IOI_CLEAN, IOI_CORRUPTED, " Mary", " John"))
    same = contrast(IOI_CLEAN, IOI_CLEAN, " Mary", " John")  # pasted twice: caught before the run too
    assert [c["is_valid"] for c in same] == [True, False, True, True] and "same logit difference" in same[1]["message"]
    explorer = validator(handlers, explorer_errors, ["prompt", "target", "competing"])
    checks = explorer("", " Paris", " Paris", 0, 0)
    assert [c["is_valid"] for c in checks] == [False, True, False, True, True]
    assert "empty" in checks[0]["message"] and "same" in checks[2]["message"]
    circuit = validator(handlers, induction_errors, ["seq_len", "batch", "seed"])
    assert [c["is_valid"] for c in circuit(1000, 2, 0)] == [False, True, True]
    task = validator(handlers, task_errors, ["task", "n", "seed", "pairs"])  # on the runner's tokenizing copy, as the page runs them
    assert [c["is_valid"] for c in task("ioi", 0, 0, "")] == [True, False, True, True]
    assert [c["is_valid"] for c in task("custom", 8, 0, "a | b")] == [True, True, True, False]
    names = ["task", "n", "seed", "pairs", "method", "steps", "selection", "k", "target", "ablation", "checks"]
    edges = validator(handlers, circuit_errors, names)
    assert [c["is_valid"] for c in edges("ioi", 8, 0, "", "eap", 5, "greedy", 0, 0, "corrupted", 5)] == [n != "k" for n in names]
    assert all(c["is_valid"] for c in edges("ioi", 8, 0, "", "eap", 5, "greedy", 6, 0, "corrupted", 5))
    busy = threading.Thread(target=handlers.runner.lock.acquire)  # the model busy elsewhere (for good): the checks do not wait
    busy.start()
    busy.join()
    assert [c["is_valid"] for c in contrast(IOI_CLEAN, "When John and Mary went", " Mary", "Berlin")] == [True, False, True, False]
    assert [c["message"] for c in explorer("", " Paris", " Paris", 0, 0)] == [c["message"] for c in checks]


def test_input_checks_tokenize_as_the_model_does_with_a_copy_of_its_tokenizer(demo_model):
    """Runner.check hands checks the model with its own tokenizer copy: the same tokens, never the tokenizer a pass uses."""
    runner = Runner(demo_model, cache_dir=None)
    tokens, str_tokens, shared = runner.check(lambda m, p: (m.to_tokens(p), m.to_str_tokens(p), m.tokenizer is demo_model.tokenizer), IOI_CLEAN)
    assert tokens.tolist() == demo_model.to_tokens(IOI_CLEAN).tolist() and str_tokens == demo_model.to_str_tokens(IOI_CLEAN)
    assert not shared


def test_persistent_cache_survives_a_restart_and_is_keyed_by_model_and_code(tiny_model, gpt2_shaped, tmp_path, monkeypatch):
    first = Runner(tiny_model, cache_dir=tmp_path)
    real = first.run(predict, IOI_CLEAN, 3, persist=True)
    (stored,) = tmp_path.glob("*.json")
    marked = dataclasses.replace(real, top_tokens=["served from disk"] * 3)
    stored.write_bytes(dumps(marked))
    assert Runner(tiny_model, cache_dir=tmp_path).run(predict, IOI_CLEAN, 3, persist=True).top_tokens[0] == "served from disk"
    # another model, or changed code, must never see that entry
    assert Runner(gpt2_shaped, cache_dir=tmp_path).run(predict, IOI_CLEAN, 3, persist=True).top_tokens[0] != "served from disk"
    monkeypatch.setattr("serving.runner.code_fingerprint", lambda: "edited code")
    assert Runner(tiny_model, cache_dir=tmp_path).run(predict, IOI_CLEAN, 3, persist=True).top_tokens[0] != "served from disk"


def test_runner_lru_is_bounded(tiny_model):
    runner = Runner(tiny_model, cache_dir=None, max_entries=3)
    for k in range(1, 6):
        runner.run(predict, IOI_CLEAN, k)
    assert len(runner._memory) == 3


def test_settings_from_arguments_and_environment(monkeypatch):
    assert app.Settings.from_env(["--model", "/models/gpt2", "--port", "9000", "--share"]) == app.Settings(
        model="/models/gpt2", host="127.0.0.1", port=9000, share=True
    )
    monkeypatch.setenv("CIRCUITBREAKER_MODEL", "distilgpt2")
    monkeypatch.setenv("GRADIO_SERVER_NAME", "0.0.0.0")
    monkeypatch.setenv("GRADIO_SERVER_PORT", "7000")
    assert app.Settings.from_env([]) == app.Settings(model="distilgpt2", host="0.0.0.0", port=7000, share=False)


def _run_app(*args, env=None):
    return subprocess.Popen(
        [sys.executable, str(ROOT / "app.py"), *args],
        cwd=ROOT,
        env={**os.environ, **(env or {})},
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )


def wait_for_page(process: subprocess.Popen, port: int) -> None:
    """Until the app answers on `port`; fails with its output if it exits first."""
    for _ in range(600):
        if process.poll() is not None:
            pytest.fail(f"app.py exited: {process.stdout.read()}")
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/", timeout=5) as response:
                assert response.status == 200
                return
        except OSError:
            time.sleep(0.5)
    pytest.fail("app.py did not answer within 5 minutes")


def test_python_app_py_serves_a_local_model_directory(tiny_model, tmp_path):
    port = free_port()
    process = _run_app("--model", tiny_model.cfg.model_name, "--port", str(port), env={"CIRCUITBREAKER_CACHE_DIR": str(tmp_path)})
    try:
        wait_for_page(process, port)
        result = Client(f"http://127.0.0.1:{port}/", verbose=False).predict(IOI_CLEAN, 2, api_name="/predict")
        assert_same_answer(result, predict(tiny_model, IOI_CLEAN, 2).to_dict())
        process.terminate()  # SIGTERM, as a Space stopping sends: a drain, then a clean exit
        output, _ = process.communicate(timeout=60)
        assert process.returncode == 0, output
        assert "CircuitBreaker: stopping: refusing new requests" in output and "CircuitBreaker: stopped\n" in output
        assert "Traceback" not in output
    finally:
        process.kill()
        process.wait(timeout=30)


def test_python_app_py_without_a_model_says_what_to_do():
    process = _run_app("--model", "circuitbreaker-test/not-cached-anywhere", env={"HF_HUB_OFFLINE": "1"})
    output, _ = process.communicate(timeout=120)
    assert process.returncode != 0
    assert "cannot be reached" in output and "local model directory" in output
    assert "Traceback" not in output


def test_quick_and_heavy_requests_queue_separately(demo_model):
    """A line of patching runs never stands in front of a logit-lens request; light requests run a
    batch at a time (they share forward passes), heavy ones one at a time."""
    demo = app.build_demo(runner=Runner(demo_model, cache_dir=None), warm=False)
    lanes = {fn.api_name: (fn.concurrency_id, fn.concurrency_limit) for fn in demo.fns.values()}
    light = ("light", LIMITS.max_batch_calls)
    assert {lanes[name] for name in ("predict", "logit_lens", "dla", "attention", "explore", "explore_example")} == {light}
    heavy = ("patching", "attribution_patching", "induction", "contrast", "circuit_map", "contrast_example", "circuit_map_example")
    assert {lanes[name] for name in heavy} == {("heavy", 1)}
    # every event that runs a handler (all but the examples' input filling, and what runs in the browser alone) is in one of the two lanes
    model_events = [fn for fn in demo.fns.values() if not fn.api_name.endswith("_load") and fn.fn is not None]
    assert all(fn.js and not fn.queue for fn in demo.fns.values() if fn.fn is None)  # those send no request
    assert {(fn.concurrency_id, fn.concurrency_limit) for fn in model_events} == {light, ("heavy", 1)}


def test_a_request_that_waits_too_long_gets_a_busy_message_and_the_next_one_works(tiny_model, tmp_path):
    runner = Runner(tiny_model, cache_dir=None, limits=Limits(max_wait_s=0.5))
    demo = app.build_demo(runner=runner, warm=False)
    port = free_port()
    demo.launch(prevent_thread_lock=True, server_name="127.0.0.1", server_port=port, quiet=True)
    try:
        client = Client(f"http://127.0.0.1:{port}/", verbose=False)
        with runner.lock:  # the model is busy with something else for longer than max_wait_s
            with pytest.raises(AppError, match="The server is busy.*Try again in a minute"):
                client.predict(IOI_CLEAN, 3, api_name="/predict")
        assert len(client.predict(IOI_CLEAN, 3, api_name="/predict")["top_tokens"]) == 3
    finally:
        demo.close()


def test_runner_results_cache_is_bounded(tiny_model):
    runner = Runner(tiny_model, cache_dir=None, max_entries=3)
    for k in range(1, 8):
        runner.run(predict, IOI_CLEAN, k)
    assert len(runner._memory) == 3


def test_downloads_on_disk_are_bounded(tiny_model, tmp_path):
    handlers = Handlers(Runner(tiny_model, cache_dir=None), str(tmp_path), max_downloads=5)
    for i in range(12):
        handlers._download("test", {"i": i})
    assert len(list(tmp_path.glob("*.json"))) == 5


def test_app_demo_is_built_once(monkeypatch):
    """`app.demo` (what `gradio app.py` reads) builds the app on first use, then hands back the same one."""
    built = []
    monkeypatch.setattr(app, "build_demo", lambda: built.append(object()) or built[-1])
    app._module_demo.cache_clear()
    try:
        assert app.demo is app.demo and len(built) == 1
    finally:
        app._module_demo.cache_clear()


def test_a_first_start_page_waits_for_no_example_and_each_tab_fills_its_own(tiny_model, tmp_path, monkeypatch):
    """warm="background" (python app.py) on an empty cache: the page computes nothing; the Prompt Explorer
    fills its first example when the page loads (computed, then drawn into hidden copies, which the browser
    shows unless the visitor's own results are shown by then: tests/test_browser.py), Contrast Pairs and the Circuit Map the first time they are opened
    (through the cache, which they fill for the next start), and opening them again changes nothing."""
    explored, explore = [], Handlers.explore
    monkeypatch.setattr(Handlers, "explore", lambda self, *args, **kwargs: explored.append(args) or explore(self, *args, **kwargs))
    runner = Runner(tiny_model, cache_dir=tmp_path)
    demo = app.build_demo(runner=runner, warm="background")
    assert runner.computed == 0
    loads = [fn for fn in demo.fns.values() if any(event == "load" for _, event in fn.targets)]
    draw = next(fn for fn in demo.fns.values() if fn.name == "draw")
    assert len(loads) == 1 and {loads[0].concurrency_id, draw.concurrency_id} == {"light"}  # the Explorer's lane
    assert ui.common.WAITING in ui.common.waiting_figure().to_json()  # what the browser looks for before it shows the fill
    first_row = example_rows(tiny_model)["explorer"][1][0]
    prompt, target, competing, layer, head = first_row
    assert loads[0].fn(layer, head) is None and runner.computed == 1  # computed, not drawn
    explored.clear()
    drawn = draw.fn(layer, 1)  # drawn at the head the slider shows then, from the cache, once
    figures = [value for block, value in drawn.items() if isinstance(block, gr.Plot)]
    assert len(figures) == 7 and all(value is not None for value in figures) and runner.computed == 1 and explored == [(*first_row[:3], layer, 1)]
    assert "head 1" in figures[5].layout.title.text  # the one head drawn large
    assert not any(block.visible for block in drawn)  # into hidden copies: the browser shows them where the figures still wait
    show = next(fn for fn in demo.fns.values() if fn.js == ui.common.SHOW_IF_WAITING)
    assert show.fn is None and show.outputs == show.inputs[len(drawn):] and show.inputs[: len(drawn)] == list(drawn)
    fills = [fn for fn in demo.fns.values() if any(event == "select" for _, event in fn.targets)]
    assert len(fills) == 2 and {fn.concurrency_id for fn in fills} == {"heavy"}  # after it, in order: what the visitor runs there
    contrast_status = next(b for b in demo.blocks.values() if getattr(b, "elem_id", None) == "contrast-status")
    assert "on their way" in contrast_status.value
    for fn in fills:
        filled = fn.fn({"filled": False})
        flag = next(block for block in filled if isinstance(block, gr.JSON))
        assert filled[flag] == {"filled": True}
        figures = [value for block, value in filled.items() if isinstance(block, gr.Plot)]
        assert figures and all(value is not None for value in figures)
        again = fn.fn({"filled": True})
        assert again.keys() == filled.keys() and all(value == gr.skip() for value in again.values())
    status = next(value for block, value in fills[0].fn({"filled": False}).items() if block is contrast_status)
    assert status.startswith("**Done:**")
    # the next start (the examples now on disk) builds every tab's first example into its page, with nothing to fill
    again = Runner(tiny_model, cache_dir=tmp_path)
    rebuilt = app.build_demo(runner=again, warm="background")
    assert again.computed == 0 and not [fn for fn in rebuilt.fns.values() if any(event in ("select", "load") for _, event in fn.targets)]
