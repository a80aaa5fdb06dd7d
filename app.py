"""CircuitBreaker: the Gradio app's entry point (a Space runs this file). It loads the model, puts
the page together from its rooms in `ui/` (one module per tab, the JSON API, the handlers they
share), closes what a public server must close (`serving/`: the runner that shares one model, the
queue's guards, the drain), and runs it.

    python app.py [--model NAME_OR_DIR] [--host HOST] [--port PORT] [--share]

Environment (for a Hugging Face Space): CIRCUITBREAKER_MODEL, GRADIO_SERVER_NAME,
GRADIO_SERVER_PORT, CIRCUITBREAKER_SHARE=1.
"""

from __future__ import annotations

import argparse
import atexit
import contextlib
import functools
import os
import shutil
import signal
import sys
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path

IMPORTED_AT = time.perf_counter()  # before the libraries: `python app.py` counts its start-up from here

os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")

import gradio as gr  # noqa: E402

import serving  # noqa: E402
import serving.restart  # noqa: E402
import ui.api  # noqa: E402
import ui.circuit_map  # noqa: E402
import ui.common  # noqa: E402
import ui.contrast  # noqa: E402
import ui.explorer  # noqa: E402
import ui.handlers  # noqa: E402
import ui.more  # noqa: E402
from core import DEFAULTS, LIMITS, ModelLoadError  # noqa: E402
from core.model import Model, default_device, describe_source, load_model, load_recorded, load_with_fallback, model_label  # noqa: E402
from core.registry import Technique, techniques  # noqa: E402
from serving.runner import DEFAULT_CACHE_DIR, ModelChanged, Runner, write_whole  # noqa: E402

THEME = gr.themes.Soft(font=["ui-sans-serif", "system-ui", "sans-serif"], font_mono=["ui-monospace", "monospace"])
CSS = """
@media (max-width: 520px) {  /* a phone: every tab name stays visible (four fit at 390 px) instead of folding into "..." */
  .tab-wrapper button { padding: 4px 5px !important; font-size: 12px !important; }
  #contrast-summary table { font-size: 12px; }
  #contrast-summary th, #contrast-summary td { padding: 4px 6px !important; word-break: normal; }
  #lens-heatmap g.heatmap-label { display: none; }  /* each cell's top-1 token: too narrow to read there (a tap shows it) */
}
"""
TABS = {  # the designed tabs, by the name a technique's `tab` gives: (id, builder)
    "Prompt Explorer": ("explorer", ui.explorer.build),
    "Contrast Pairs": ("contrast", ui.contrast.build),
    "Circuit Map": ("circuit_map", ui.circuit_map.build),
}
MAX_UPLOAD = f"{4 * LIMITS.max_task_chars // 1000}kb"  # the one upload: a task's pairs (at most max_task_chars, 4 bytes each in UTF-8)


def launch_options() -> dict:
    """What launch() needs besides where to listen (Gradio 6 takes the look there), for main() and the
    tests' servers: theme, CSS, the upload cap, and the request body cap (a fresh dict each launch)."""
    return dict(theme=THEME, css=CSS, max_file_size=MAX_UPLOAD, app_kwargs=serving.app_kwargs(LIMITS.max_request_bytes))


def build_demo(
    model: Model | None = None,
    runner: Runner | None = None,
    warm: bool | str = True,
    notice: str | None = None,
    say=None,
    registry: dict[str, Technique] | None = None,
) -> gr.Blocks:
    """The whole app around `model` (default: the configured model, or the demo model when it cannot
    be loaded). `warm`: True precomputes every example before the page is built; "background" leaves
    them to `demo.warm_examples(stopping=...)` (a thread, started once the page serves, the first tab's first
    example first; the page has each tab's first example where the runner finds it in its cache without
    computing, which a runner still loading a first start's model cannot; the tab shown first fills its own
    when the page loads, the others when first opened); `notice` is shown at the top of the page;
    `say(line)` hears start-up progress; `registry`: the techniques (default: every one in core)."""
    registry = techniques() if registry is None else registry
    untabbed = {name: t for name, t in registry.items() if t.tab is None}
    if model is None and runner is None:
        model, notice = load_with_fallback(Settings.from_env().model)
    runner = runner or Runner(model)
    runner.still_wanted = serving.event_wanted
    model = runner.model if model is None else model  # a restart's page: the record's sketch of the model (serving.restart)
    downloads, downloads_off = download_folder()
    handlers = ui.handlers.Handlers(runner, downloads)
    handlers.defer_examples = warm == "background"  # the page waits for no example: each tab fills its first one (from the cache if there)
    if warm is True:
        ui.handlers.warm_examples(handlers, say)
    with gr.Blocks(title="CircuitBreaker", delete_cache=(600, 3600)) as demo:  # served files: hourly clean-up
        gr.Markdown(
            f"# CircuitBreaker\nWatch **{model_label(model)}** ({model.cfg.n_layers} layers x {model.cfg.n_heads} heads) "
            "think: logit lens, direct logit attribution, attention, induction heads and activation patching."
        )
        if notice:  # one short line; the reason and what to do sit folded below it
            gr.Markdown(f"⚠️ This is the small **demo model** bundled with CircuitBreaker, not {DEFAULTS.model_name}.", elem_id="model-notice")
            with gr.Accordion("Why, and how to get GPT-2", open=False):
                gr.Textbox(notice, show_label=False, interactive=False, container=False, lines=2)
        if downloads_off:
            gr.Markdown(f"⚠️ JSON downloads are off: {downloads_off} Every result is still shown.", elem_id="downloads-notice")
        with gr.Tabs():
            for name, (tab_id, build) in TABS.items():
                with gr.Tab(name, id=tab_id) as tab:
                    fill = build(handlers, model)
                    if fill is not None:  # its first example was left out of the page (not shown first, not cached yet)
                        ui.common.fill_when_opened(tab, *fill)
            if untabbed:
                with gr.Tab("More", id="more"):  # short: four tab names still fit a phone's width
                    ui.more.build(handlers, model, untabbed)
        ui.api.build(runner, model, registry)
    # api_open=False: every call goes through the queue and its lanes (gradio_client uses the queue
    # too); Gradio would otherwise leave /gradio_api/run/<name> open, which skips both.
    demo.queue(default_concurrency_limit=1, max_size=LIMITS.max_queue_size, api_open=False)
    serving.guard_queue(demo, LIMITS.max_requests_per_client)
    if warm == "background":
        demo.warm_examples = functools.partial(ui.handlers.warm_in_background, handlers, say=say)
    return demo


def download_folder() -> tuple[str | None, str | None]:
    """(a new folder for this start's JSON downloads, removed at exit; None and why when the temporary
    folder cannot take one: full or read-only. The app starts either way.)"""
    folder = None
    try:
        folder = tempfile.mkdtemp(prefix="circuitbreaker-downloads-")
        write_whole(Path(folder) / "probe", b"{}")  # a folder can be made on a full disk; a file cannot
        (Path(folder) / "probe").unlink()
    except OSError as err:
        if folder is not None:
            shutil.rmtree(folder, ignore_errors=True)
        return None, f"the server's temporary folder ({tempfile.gettempdir()}) cannot take files ({err.strerror or err})."
    atexit.register(shutil.rmtree, folder, ignore_errors=True)  # no directory left behind per start
    return folder, None


# --- running it ---------------------------------------------------------------------


@dataclass(frozen=True)
class Settings:
    model: str = DEFAULTS.model_name
    host: str = "127.0.0.1"
    port: int = 7860
    share: bool = False

    @classmethod
    def from_env(cls, argv: list[str] | None = None) -> "Settings":
        env = os.environ
        parser = argparse.ArgumentParser(description="CircuitBreaker: mechanistic interpretability of GPT-2 Small.")
        parser.add_argument("--model", default=env.get("CIRCUITBREAKER_MODEL", cls.model), help="model name or local HF model directory")
        parser.add_argument("--host", default=env.get("GRADIO_SERVER_NAME", cls.host))
        parser.add_argument("--port", type=int, default=int(env.get("GRADIO_SERVER_PORT", cls.port)))
        parser.add_argument("--share", action="store_true", default=env.get("CIRCUITBREAKER_SHARE") == "1")
        args = parser.parse_args([] if argv is None else argv)
        return cls(model=args.model, host=args.host, port=args.port, share=args.share)


def say(line: str) -> None:
    """One start-up progress line on the console."""
    print(f"CircuitBreaker: {line}", flush=True)


@contextlib.contextmanager
def forgotten_on_failure(settings: Settings, device: str, demo: gr.Blocks | None = None):
    """Around a restart's model loading: if it fails, or the model is not the recorded one, the page
    closes, the record goes (the next start is an ordinary one) and the app stops, saying why."""
    try:
        yield
    except Exception as err:
        serving.restart.forget(DEFAULT_CACHE_DIR, settings.model, device)
        if demo is not None:
            demo.close()
        if isinstance(err, (ModelLoadError, ModelChanged)):
            raise SystemExit(f"CircuitBreaker: {err}") from None
        raise


def ordinary_start(settings: Settings, start: float, device: str) -> tuple[gr.Blocks, Runner]:
    """The page around a model loaded first (or the demo model standing in for the default one): a first
    download from the Hub, or a first start whose model did not load behind its page."""
    say(f"loading {settings.model} from {describe_source(settings.model)} ...")
    try:
        model, notice = load_with_fallback(settings.model)
    except ModelLoadError as err:
        raise SystemExit(f"CircuitBreaker: {err}") from None
    if notice:
        say(notice)
    say(f"loaded {model_label(model)} ({model.cfg.n_layers} layers x {model.cfg.n_heads} heads) in {time.perf_counter() - start:.1f} s; building the page")
    runner = Runner(model)
    demo = build_demo(model, runner=runner, notice=notice, say=say, warm="background")
    if notice is None:  # the model asked for (not the demo model standing in): a restart can serve its page first
        serving.restart.remember(DEFAULT_CACHE_DIR, settings.model, device, model, runner.fingerprint)
    return demo, runner


def load_sketched(name: str, sketch) -> Model:
    """load_model(name) for a page built on `sketch`: a model that is not what the sketch said never reaches
    the runner (nothing is computed on it for that page)."""
    model = load_model(name)
    if not serving.restart.sketched(model, sketch):
        raise ModelLoadError(f"{model_label(model)} is not the model its config.json describes: the page was built for that one.")
    return model


def loaded_behind(runner: Runner) -> Model | None:
    """A first start's model, loaded behind its page: None (said why) where it failed to load, or is not the
    model the page was built for (then the app starts again the ordinary way)."""
    try:
        return runner.model
    except Exception as err:  # noqa: BLE001 - whatever stopped it: the ordinary start says why, or falls back to the demo model
        say(f"the model did not load behind the page ({type(err).__name__}): starting again, the model first")
        return None


def main(argv: list[str] | None = None) -> None:
    settings = Settings.from_env(sys.argv[1:] if argv is None else argv)
    start = IMPORTED_AT if __name__ == "__main__" else time.perf_counter()  # `python app.py`: the imports count too
    device = default_device()
    record = serving.restart.recall(DEFAULT_CACHE_DIR, settings.model, device)
    sketch = None if record is not None else serving.restart.first_sketch(settings.model)
    if record is not None:  # a restart: the page first (from the last start's record and the example cache), then the model
        say(f"restarting on {settings.model} (its files and CircuitBreaker's code unchanged since the last start): "
            f"the page first, then the model from {record.source}")
        runner = Runner(loader=functools.partial(load_recorded, settings.model, record.source), fingerprint=record.fingerprint)
        with forgotten_on_failure(settings, device):
            demo = build_demo(record.sketch(), runner=runner, say=say, warm="background")
    elif sketch is not None:  # a first start on files already here: the page first too (its shape from config.json)
        say(f"loading {settings.model} from {describe_source(settings.model)}, behind the page ...")
        runner = Runner(loader=functools.partial(load_sketched, settings.model, sketch))
        demo = build_demo(sketch, runner=runner, say=say, warm="background")
    else:
        demo, runner = ordinary_start(settings, start, device)
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):  # a Space stopping or Ctrl-C: finish running requests first
        signal.signal(sig, lambda *_: stop.set())

    def serve(demo: gr.Blocks) -> None:
        demo.launch(
            server_name=settings.host, server_port=settings.port, share=settings.share, footer_links=["api"],
            prevent_thread_lock=True, **launch_options(),
        )
        say(f"ready in {time.perf_counter() - start:.1f} s; the examples are computed in the background (a first start: a few minutes "
            "for GPT-2 on a CPU), each from the cache if there, and one not ready yet runs when clicked")

    serve(demo)
    model = None
    if record is not None and not runner.loaded:  # a restart's page serves (its first examples from the cache); a click that needs the model waits for this
        with forgotten_on_failure(settings, device, demo):
            model = runner.model
    elif sketch is not None:  # a first start's page serves; the model loads behind it (or has, for a request)
        model = loaded_behind(runner)
        if model is None:  # the page closes; the ordinary start loads the model (or says why not, or falls back to the demo model)
            demo.close()
            if stop.is_set():  # Ctrl-C or SIGTERM meanwhile: no second start
                say("stopped")
                return
            demo, runner = ordinary_start(settings, start, device)
            serve(demo)
        else:
            serving.restart.remember(DEFAULT_CACHE_DIR, settings.model, device, model, runner.fingerprint)
    if model is not None:
        say(f"loaded {model_label(model)} ({model.cfg.n_layers} layers x {model.cfg.n_heads} heads) in {time.perf_counter() - start:.1f} s")
    console = threading.Lock()  # the warming's lines and "stopping": none of them after "stopping"

    def say_warming(line: str) -> None:
        with console:
            if not stop.is_set():
                say(line)

    warming = demo.warm_examples(stopping=stop.is_set, say=say_warming)  # a stop ends the warming too
    while not stop.wait(0.5):
        pass
    signal.signal(signal.SIGINT, signal.default_int_handler)  # a second Ctrl-C (or SIGTERM) stops at once
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    with console:
        say(f"stopping: refusing new requests, finishing the running ones (at most {LIMITS.drain_s:.0f} s) ...")
    finished = serving.drain(demo, LIMITS.drain_s)
    warming.join(LIMITS.drain_s)  # its example under way (a thread still inside torch at exit would abort the process)
    demo.close()
    say("stopped" if finished else f"stopped; requests still running after {LIMITS.drain_s:.0f} s were cut off")


@functools.cache
def _module_demo() -> gr.Blocks:
    return build_demo()


def __getattr__(name: str):
    """`app.demo` (for `gradio app.py` reload mode) is built on first use, not on import, and once."""
    if name == "demo":
        return _module_demo()
    raise AttributeError(name)


if __name__ == "__main__":
    main()
