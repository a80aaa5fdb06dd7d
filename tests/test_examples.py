"""The README's snippets and the example scripts run as written, offline, on the model the app falls
back to (the bundled demo model): what a new user copies must work."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
README_URL = "http://127.0.0.1:7860/"
# No network; figure.show() opens its page in a "browser" that fetches it (as a real one would) and exits.
# (webbrowser waits for the browser command, and plotly serves the page only after it returns: so in the background)
FETCH = f"sh -c '{sys.executable} -c \"import sys, urllib.request; urllib.request.urlopen(sys.argv[1]).read()\" \"$0\" &' %s"
OFFLINE = {"HF_HUB_OFFLINE": "1", "TQDM_DISABLE": "1", "PLOTLY_RENDERER": "browser", "BROWSER": FETCH}


def python_snippets() -> list[str]:
    return re.findall(r"```python\n(.*?)```", (ROOT / "README.md").read_text(encoding="utf-8"), flags=re.S)


def run_python(args: list[str], cwd: Path = ROOT) -> subprocess.CompletedProcess:
    result = subprocess.run(
        [sys.executable, *args], cwd=cwd, env={**os.environ, **OFFLINE}, capture_output=True, text=True, timeout=600
    )
    assert result.returncode == 0, f"{args} failed:\n{result.stdout}\n{result.stderr}"
    return result


def test_every_readme_python_snippet_runs_as_written(server):
    snippets = python_snippets()
    assert len(snippets) == 2 and README_URL in snippets[0]
    for snippet in snippets:  # in Python started at the repository root, as the README's commands are
        run_python(["-c", snippet.replace(README_URL, server)])  # (the test server has its own port)


def test_client_example_runs_against_the_demo_model(server):
    output = run_python(["examples/client.py", server]).stdout
    assert "logit(' Mary') - logit(' John')" in output and "Pearson r" in output and "approximate=True" in output


def test_quickstart_runs_on_the_demo_model_and_its_figures_work_offline(tmp_path):
    assert "demo" in run_python(["-m", "examples.quickstart", "--help"]).stdout
    output = run_python(["-m", "examples.quickstart", "--model", "demo", "--out", str(tmp_path)]).stdout
    assert "Induction heads" in output and f"Wrote 13 figures to {tmp_path}" in output
    pages = sorted(tmp_path.glob("*.html"))
    assert len(pages) == 13 and (tmp_path / "plotly.min.js").stat().st_size > 1_000_000
    for page in pages:  # plotly.js comes from the folder, never from a CDN
        html = page.read_text(encoding="utf-8")
        assert 'src="plotly.min.js"' in html and "cdn.plot.ly" not in html
