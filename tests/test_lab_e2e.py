"""End to end in a real JupyterLab and a real browser (Debian's chromium, headless, driven
by Playwright): the toolbar's Checkpoint and Restore… buttons bring a notebook's kernel
back, with its variables and a half-consumed generator - into a new kernel after the
kernel was shut down, and in place after its process was killed and restarted empty.

The screenshot of the restored notebook is written to the test's tmp dir and copied to
tests/artifacts/lab-restore.png (not in git; docs/images/lab-restore.png is one of them).
"""
from __future__ import annotations

import json
import shutil
import time
from pathlib import Path

import psutil
import pytest
from playwright.sync_api import TimeoutError as PlaywrightTimeout
from playwright.sync_api import expect, sync_playwright

from test_serverext import API, KERNEL, Server, wait_kernel_gone

CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync", "--no-first-run", "--disable-quic"]
ARTIFACTS = Path(__file__).resolve().parent / "artifacts"
NOTEBOOK = "demo.ipynb"
UI_TIMEOUT = 60_000          # ms, for every wait on the page (a cold JupyterLab loads slowly)
expect.set_options(timeout=UI_TIMEOUT)


def write_notebook(path: Path) -> None:
    cells = [
        "x = 41\ng = iter(range(10))\nprint('started:', next(g), next(g))",
        "print('after restore:', x, next(g))",
    ]
    nb = {
        "nbformat": 4, "nbformat_minor": 5,
        "metadata": {"kernelspec": {"name": KERNEL, "display_name": "Python 3 (checkpointable)",
                                    "language": "python"}},
        "cells": [{"cell_type": "code", "id": f"c{i}", "metadata": {}, "execution_count": None,
                   "outputs": [], "source": src} for i, src in enumerate(cells)],
    }
    path.write_text(json.dumps(nb, indent=1))


def write_lab_settings(settings: Path) -> None:
    """No news or update toasts: the only toasts on screen are ours."""
    d = settings / "@jupyterlab" / "apputils-extension"
    d.mkdir(parents=True, exist_ok=True)
    (d / "notification.jupyterlab-settings").write_text(
        json.dumps({"fetchNews": "false", "checkForUpdates": False}))


@pytest.fixture
def lab(tmp_path):
    base = tmp_path / "lab"
    base.mkdir()
    (base / "root").mkdir()
    write_notebook(base / "root" / NOTEBOOK)
    write_lab_settings(base / "settings")
    s = Server(base, app="jupyterlab", extra_args=[
        f"--LabApp.user_settings_dir={base / 'settings'}",
        f"--LabApp.workspaces_dir={base / 'workspaces'}",
    ])
    yield s
    s.stop()


def notebook_kernel(server: Server) -> dict | None:
    for s in server.ok("GET", "/api/sessions"):
        if s["path"] == NOTEBOOK:
            return s["kernel"]
    return None


def wait_for(what: str, check, timeout: float = 60):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = check()
        if value:
            return value
        time.sleep(0.2)
    raise AssertionError(f"timed out waiting for {what}")


def run_cell(page, index: int) -> None:
    cell = page.locator(".jp-Notebook .jp-Cell").nth(index)
    cell.locator(".jp-InputArea-editor").click()
    page.keyboard.press("Shift+Enter")


def cell_output(page, index: int):
    return page.locator(".jp-Notebook .jp-Cell").nth(index).locator(".jp-OutputArea-output")


def test_checkpoint_and_restore_buttons(lab, tmp_path):
    shots = tmp_path / "shots"
    shots.mkdir()
    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS, headless=True)
        try:
            page = browser.new_page(viewport={"width": 1400, "height": 900})
            page.set_default_timeout(UI_TIMEOUT)
            errors = []
            page.on("pageerror", lambda e: errors.append(str(e)))
            page.goto(f"{lab.url}/lab/tree/{NOTEBOOK}?token={lab.token}")
            try:
                _scenario(page, lab, shots)
            except BaseException:
                page.screenshot(path=str(shots / "failure.png"))
                raise
            finally:
                ARTIFACTS.mkdir(exist_ok=True)
                for png in shots.glob("*.png"):
                    shutil.copy(png, ARTIFACTS / png.name)
            assert not [e for e in errors if "nbcheckpoint" in e], errors
        finally:
            browser.close()


def _scenario(page, lab: Server, shots: Path) -> None:
    # the notebook opens on its checkpointable kernel, with our two buttons
    checkpoint_btn = page.locator(".jp-NotebookPanel-toolbar .jp-nbcheckpoint-checkpoint")
    restore_btn = page.locator(".jp-NotebookPanel-toolbar .jp-nbcheckpoint-restore")
    expect(checkpoint_btn).to_be_visible()
    expect(restore_btn).to_be_visible()
    kernel = wait_for("the notebook's kernel to be idle",
                      lambda: (k := notebook_kernel(lab)) and k["execution_state"] == "idle" and k)
    assert kernel["name"] == KERNEL
    kid = kernel["id"]

    # state: a variable and a half-consumed generator
    run_cell(page, 0)
    expect(cell_output(page, 0)).to_contain_text("started: 0 1")

    # Checkpoint -> a toast with the name, the size and the time
    checkpoint_btn.click()
    toast = page.locator(".Toastify__toast", has_text="saved")
    expect(toast).to_be_visible()
    text = toast.inner_text()
    listed = lab.ok("GET", f"{API}/checkpoints", params={"kernel_id": kid})
    assert len(listed) == 1, listed
    name = listed[0]["name"]
    assert f'Checkpoint "{name}" saved' in text and "B in " in text, text
    assert listed[0]["notebook"] == NOTEBOOK and listed[0]["execution_count"] == 1
    page.wait_for_timeout(1000)                      # let the toasts finish sliding in
    page.screenshot(path=str(shots / "lab-checkpoint.png"))

    # the kernel goes away
    lab.ok("DELETE", f"/api/kernels/{kid}", 204)
    wait_kernel_gone(kid)
    wait_for("the server to forget the kernel", lambda: notebook_kernel(lab) is None)

    # Restore… -> the dialog lists the checkpoint -> restore it into a new kernel
    restore_btn.click()
    dialog = page.locator(".jp-Dialog")
    expect(dialog).to_contain_text(name)
    dialog.locator(f"tr[data-name='{name}']").click()
    expect(dialog.locator(f"input[value='{name}']")).to_be_checked()
    page.screenshot(path=str(shots / "lab-restore-dialog.png"))
    dialog.locator(".jp-Dialog-button.jp-mod-accept").click()
    expect(page.locator(".Toastify__toast", has_text="Restored")).to_be_visible()
    new = wait_for("the notebook's session on the restored kernel",
                   lambda: (k := notebook_kernel(lab)) and k["id"] != kid and k)
    assert new["name"] == KERNEL

    # the old state is there
    run_cell(page, 1)
    expect(cell_output(page, 1)).to_contain_text("after restore: 41 2")
    page.wait_for_timeout(1000)
    page.screenshot(path=str(shots / "lab-restore.png"))

    # the kernel's process dies (kill -9 of its shim): the server restarts it, empty, under
    # the same id; Restore… now restores in place, into that kernel
    shims = [p for p in psutil.process_iter(["cmdline"])
             if new["id"] in (p.info["cmdline"] or []) and "nbcheckpoint.jupyter.shim" in p.info["cmdline"]]
    shim = [p for p in shims if p.ppid() not in {q.pid for q in shims}]   # not its forked init
    assert len(shim) == 1, shims
    shim = shim[0]
    shim.kill()
    wait_for("the restarted kernel", lambda: not shim.is_running() and
             (k := notebook_kernel(lab)) and k["id"] == new["id"] and k["execution_state"] == "idle")
    restarting = page.locator(".jp-Dialog", has_text="Restarting")
    try:
        restarting.wait_for(timeout=5000)
        restarting.locator(".jp-Dialog-button.jp-mod-accept").click()
    except PlaywrightTimeout:
        pass
    run_cell(page, 1)
    expect(cell_output(page, 1)).to_contain_text("NameError")
    restore_btn.click()
    dialog = page.locator(".jp-Dialog", has_text="Restore a checkpoint")
    dialog.locator(f"tr[data-name='{name}']").click()
    dialog.locator(".jp-Dialog-button.jp-mod-accept").click()
    expect(page.locator(".Toastify__toast", has_text="into this kernel")).to_be_visible()
    assert notebook_kernel(lab)["id"] == new["id"]
    run_cell(page, 1)
    expect(cell_output(page, 1)).to_contain_text("after restore: 41 2")
    page.wait_for_timeout(1000)
    page.screenshot(path=str(shots / "lab-restore-in-place.png"))
