"""JupyterLab as a person uses it: a real server, a real browser, Run All Cells through the menu.

``make test-lab`` runs this file. It starts ``jupyter lab`` on a free local port with a token,
serving the repository as ``make lab`` does, with Lab's settings, workspaces and runtime files in
a temporary folder (autosave off there, so the notebooks in git are never rewritten), and drives
Debian's Chromium through Playwright (``executable_path``; no browser download). For each
notebook it waits for the project's kernel, runs Run All Cells from the Run menu and checks: no
error output, at least one rendered image where the notebook draws one, and, in the training
notebook, progress in the training cell *before* that cell finishes. It also opens
``reports/report.md`` from the file browser. Screenshots of the last run go to
``build/test-lab/`` (ignored by git) for a person to look at.
"""

from __future__ import annotations

import json
import os
import re
import secrets
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

pytestmark = pytest.mark.lab

ROOT = Path(__file__).resolve().parents[1]
SHOTS = ROOT / "build" / "test-lab"
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
KERNEL_NAME = "anchorformer (.venv)"

if CHROMIUM is None:
    pytest.skip("no chromium on PATH (apt-get install chromium): JupyterLab not tested", allow_module_level=True)
sync_api = pytest.importorskip("playwright.sync_api", reason="playwright is in the dev extra (make env)")

# Parameters a person sets in the training notebook before Run All Cells: more epochs of the smoke
# run, so that training lasts seconds and its progress can be seen while the cell runs.
TRAINING_PARAMETERS = {"epochs": "30"}

# (notebook, draws an image, trains): the notebooks driven, each with Run All Cells. 90's smoke
# report shows the figures of the stages' outputs, which a fresh clone lacks (DVC-cached): it must
# show no broken image; the committed report's figures are checked in its Markdown preview below.
NOTEBOOKS = [
    ("01_complexity.ipynb", True, False),
    ("10_classification.ipynb", True, True),
    ("90_report.ipynb", False, False),
]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _git_status() -> list[str]:
    out = subprocess.run(
        ["git", "status", "--porcelain", "--untracked-files=all"], cwd=ROOT, capture_output=True, text=True
    )
    return sorted(out.stdout.splitlines()) if out.returncode == 0 else []


def _get_json(url: str) -> dict:
    with urllib.request.urlopen(url, timeout=5) as r:  # noqa: S310 (a local server this test started)
        return json.loads(r.read().decode())


@pytest.fixture(scope="module")
def lab(tmp_path_factory: pytest.TempPathFactory):
    """A JupyterLab server on the repository; yields (base URL, token). The tree's git status must not change."""
    tmp = tmp_path_factory.mktemp("lab")
    settings = tmp / "settings"
    docmanager = settings / "@jupyterlab" / "docmanager-extension"
    docmanager.mkdir(parents=True)
    (docmanager / "plugin.jupyterlab-settings").write_text(json.dumps({"autosave": False}))
    notebook = settings / "@jupyterlab" / "notebook-extension"
    notebook.mkdir(parents=True)  # every cell in the page, not only those scrolled into view
    (notebook / "tracker.jupyterlab-settings").write_text(json.dumps({"windowingMode": "none"}))
    port, token = _free_port(), secrets.token_hex(16)
    env = dict(os.environ)
    env.update(
        JUPYTER_CONFIG_DIR=str(tmp / "config"),
        JUPYTER_RUNTIME_DIR=str(tmp / "runtime"),
        HF_HUB_OFFLINE="1",
        PYTHONUNBUFFERED="1",
    )
    cmd = [sys.executable, "-m", "jupyterlab", "--no-browser", f"--port={port}", "--ServerApp.ip=127.0.0.1"]
    cmd += [f"--ServerApp.token={token}", f"--ServerApp.root_dir={ROOT}", "--ServerApp.default_url=/lab/tree/notebooks"]
    cmd += [f"--LabApp.user_settings_dir={settings}", f"--LabApp.workspaces_dir={tmp / 'workspaces'}"]
    if hasattr(os, "geteuid") and os.geteuid() == 0:
        cmd.append("--allow-root")
    before = _git_status()
    log = (tmp / "lab.log").open("w")
    server = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT)
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                _get_json(f"{base}/api/status?token={token}")
                break
            except OSError:
                if server.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(f"jupyter lab did not start: {(tmp / 'lab.log').read_text()[-2000:]}") from None
                time.sleep(0.3)
        yield base, token
    finally:
        server.terminate()
        try:
            server.wait(timeout=20)
        except subprocess.TimeoutExpired:
            server.kill()
        log.close()
    assert _git_status() == before, "driving JupyterLab changed files git tracks or sees"


@pytest.fixture(scope="module")
def browser():
    SHOTS.mkdir(parents=True, exist_ok=True)
    args = ["--no-sandbox"] if hasattr(os, "geteuid") and os.geteuid() == 0 else []
    with sync_api.sync_playwright() as p:
        b = p.chromium.launch(executable_path=CHROMIUM, args=args, headless=True)
        yield b
        b.close()


@pytest.fixture
def page(browser):
    context = browser.new_context(viewport={"width": 1400, "height": 1000})
    page = context.new_page()
    yield page
    context.close()


def _status_bar(page) -> str:
    return page.evaluate("() => document.querySelector('.jp-StatusBar-Widget')?.textContent || ''")


def _open_notebook(page, base: str, token: str, path: str) -> None:
    page.goto(f"{base}/lab/tree/{path}?token={token}&reset")  # reset: no tabs of the last page restored
    page.wait_for_selector(".jp-NotebookPanel:not(.lm-mod-hidden) .jp-CodeCell", timeout=90_000)
    deadline = time.monotonic() + 120
    while not (KERNEL_NAME in _status_bar(page) and "Idle" in _status_bar(page)):
        assert time.monotonic() < deadline, (
            f"{path}: the kernel {KERNEL_NAME!r} never became idle: {_status_bar(page)!r}"
        )
        assert not page.locator(".jp-Dialog").count(), (
            f"{path}: a dialog opened: {page.locator('.jp-Dialog').inner_text()}"
        )
        time.sleep(0.25)


def _set_parameters(page, notebook: str, values: dict[str, str]) -> None:
    """Edit the parameters cell in the browser, as a person does (the file is not saved)."""
    nb = json.loads((ROOT / "notebooks" / notebook).read_text(encoding="utf-8"))
    cell = next(c for c in nb["cells"] if "parameters" in c.get("metadata", {}).get("tags", []))
    source = "".join(cell["source"])
    for name, value in values.items():
        source, n = re.subn(rf"^{name} = [^#\n]*", f"{name} = {value}  ", source, flags=re.M)
        assert n == 1, f"{notebook}: no parameter {name!r} in its parameters cell"
    index = [c["cell_type"] for c in nb["cells"]][: nb["cells"].index(cell)].count("code")
    editor = page.locator(".jp-NotebookPanel:not(.lm-mod-hidden) .jp-CodeCell .cm-content").nth(index)
    editor.click()
    page.keyboard.press("Control+a")
    page.keyboard.insert_text(source)
    page.keyboard.press("Escape")
    typed = editor.inner_text()
    assert all(f"{name} = {value}" in typed for name, value in values.items()), typed


def _run_all(page) -> None:
    page.locator(".lm-MenuBar-item", has_text=re.compile(r"^Run$")).click()
    page.locator('.lm-Menu-item[data-command="runmenu:run-all"]').click()


_CELLS_JS = """() => Array.from(document.querySelectorAll('.jp-NotebookPanel:not(.lm-mod-hidden) .jp-CodeCell')).map(c => ({
  prompt: (c.querySelector('.jp-InputArea-prompt')?.textContent || '').trim(),
  progress: c.querySelectorAll('.widget-hprogress, .jp-OutputArea-output progress').length,
  text: (c.querySelector('.jp-OutputArea')?.textContent || ''),
  errors: c.querySelectorAll('.jp-OutputArea-output[data-mime-type="application/vnd.jupyter.error"]').length,
}))"""


def _run_and_watch(page, name: str, timeout: float) -> dict:
    """Run All Cells; poll until every code cell has run. Returns what was seen while it ran."""
    _run_all(page)
    seen = {"progress_while_running": False, "log_while_running": False}
    deadline = time.monotonic() + timeout
    started = False
    while True:
        cells = page.evaluate(_CELLS_JS)
        running = [c for c in cells if c["prompt"] == "[*]:"]
        started = started or bool(running)
        errors = sum(c["errors"] for c in cells)
        assert not errors, f"{name}: error output: {[c['text'][-800:] for c in cells if c['errors']]}"
        for c in running:
            if c["progress"] and not seen["progress_while_running"]:
                seen["progress_while_running"] = True
                page.screenshot(path=str(SHOTS / f"{Path(name).stem}_running.png"))
            if re.search(r"\d\d:\d\d:\d\d (training|global batch|epoch)", c["text"]):  # the package's log
                seen["log_while_running"] = True
        if started and cells and all(re.fullmatch(r"\[\d+\]:", c["prompt"]) for c in cells):
            break
        assert time.monotonic() < deadline, f"{name}: not finished after {timeout} s: {[c['prompt'] for c in cells]}"
        time.sleep(0.1)
    page.screenshot(path=str(SHOTS / f"{Path(name).stem}.png"), full_page=True)
    return seen


def _rendered_images(page) -> int:
    """Images in the outputs that the browser could load and draw."""
    return page.evaluate(
        """() => Array.from(document.querySelectorAll('.jp-NotebookPanel:not(.lm-mod-hidden) .jp-OutputArea-output img'))
            .filter(i => i.complete && i.naturalWidth > 0).length"""
    )


def _broken_images(page) -> list[str]:
    return page.evaluate(
        """() => Array.from(document.querySelectorAll('.jp-NotebookPanel:not(.lm-mod-hidden) .jp-OutputArea-output img'))
            .filter(i => i.complete && i.naturalWidth === 0).map(i => i.getAttribute('src'))"""
    )


@pytest.mark.parametrize(("notebook", "draws", "trains"), NOTEBOOKS, ids=[n for n, *_ in NOTEBOOKS])
def test_run_all_cells_in_the_browser(lab, page, notebook: str, draws: bool, trains: bool) -> None:
    base, token = lab
    _open_notebook(page, base, token, f"notebooks/{notebook}")
    if trains:
        _set_parameters(page, notebook, TRAINING_PARAMETERS)
    seen = _run_and_watch(page, notebook, timeout=150)
    page.wait_for_function(
        """() => Array.from(document.querySelectorAll('.jp-NotebookPanel:not(.lm-mod-hidden) .jp-OutputArea-output img'))
            .every(i => i.complete)""",
        timeout=30_000,
    )
    assert _broken_images(page) == [], f"{notebook}: images that do not load: {_broken_images(page)}"
    if draws:
        assert _rendered_images(page) >= 1, f"{notebook}: no image rendered in its outputs"
    if trains:
        assert seen["progress_while_running"], f"{notebook}: no progress bar in the training cell while it ran"
        assert seen["log_while_running"], f"{notebook}: no epoch log line in the training cell while it ran"
    # the kernel holds its memory until shut down (README): shut it down, as a person should
    page.locator(".lm-MenuBar-item", has_text=re.compile(r"^Kernel$")).click()
    page.locator('.lm-Menu-item[data-command="kernelmenu:shutdown"]').click()
    dialog = page.locator(".jp-Dialog .jp-mod-accept")
    if dialog.count():
        dialog.first.click()


def test_no_news_popup_and_the_report_opens_from_the_file_browser(lab, page) -> None:
    base, token = lab
    settings = _get_json(f"{base}/lab/api/settings/@jupyterlab/apputils-extension:notification?token={token}")
    # the server folds the overrides into the defaults it serves
    defaults = {k: v.get("default") for k, v in settings["schema"]["properties"].items()}
    assert defaults["fetchNews"] == "false", "make env installs scripts/lab_overrides.json as Lab's overrides"
    assert defaults["checkForUpdates"] is False
    page.goto(f"{base}/lab?token={token}&reset")
    page.wait_for_selector(".jp-DirListing-content", timeout=90_000)
    # the server's root is the repository: the file browser opens on notebooks/, reports/ is one level up
    page.goto(f"{base}/lab/tree/reports?token={token}&reset")
    item = page.locator(".jp-DirListing-item", has_text=re.compile(r"^report\.md"))
    item.first.wait_for(timeout=30_000)
    item.first.click(button="right")  # Open With > Markdown Preview, as a person reads it
    page.locator(".lm-Menu-item", has_text="Open With").first.hover()
    page.locator(".lm-Menu-item", has_text="Markdown Preview").first.click()
    page.wait_for_selector(".jp-RenderedMarkdown img", timeout=30_000)
    page.wait_for_function(
        "() => Array.from(document.querySelectorAll('.jp-RenderedMarkdown img')).every(i => i.complete)", timeout=30_000
    )
    images = page.evaluate(
        "() => Array.from(document.querySelectorAll('.jp-RenderedMarkdown img')).map(i => [i.getAttribute('src'), i.naturalWidth])"
    )
    assert [src for src, width in images if not width] == [], "figures of reports/report.md that do not load"
    assert len(images) >= 5, f"reports/report.md shows {len(images)} figures"
    text = page.locator(".jp-RenderedMarkdown").first.inner_text()
    assert "AnchorFormer" in text, f"reports/report.md rendered without its title: {text[:200]!r}"
    assert not page.locator(".jp-Notification-Toast").filter(has_text=re.compile("news", re.I)).count()
    page.screenshot(path=str(SHOTS / "report_md.png"))
