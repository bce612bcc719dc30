"""The notebooks in notebooks/, executed with nbclient in the checkpointable kernel.

nbclient runs every cell for real, except the cells that end the kernel process they run
in, which no execute_reply can come back from.  The harness runs those itself, as a user
or a batch system would:

* ``nbcheckpoint-kills-kernel``: the cell is sent and the kernel dies; the harness then
  restarts the kernel, as Jupyter's restarter does;
* ``nbcheckpoint-replaces-kernel`` (``%restore``): the cell is sent; the shim replaces the
  kernel in place, and the harness waits until the same client gets answers again;
* ``nbcheckpoint-preempted``: the cell is sent and the kernel dies; the harness starts a
  new kernel (a new manager, as a requeued job would) from the latest checkpoint.

What the kernel said meanwhile becomes the cell's output in the executed notebook.
"""
from __future__ import annotations

import asyncio
import time
from pathlib import Path

import nbformat
from jupyter_client.manager import AsyncKernelManager
from nbclient import NotebookClient

from nbcheckpoint.store import Store

NOTEBOOKS = Path(__file__).resolve().parent.parent / "notebooks"
SPEC = "python3-checkpointable"


def _stream_output(texts: list[str]) -> list:
    text = "".join(texts)
    return [nbformat.v4.new_output("stream", name="stdout", text=text)] if text else []


async def _collect(kc, until: float, stop_text: str | None = None, texts: list | None = None) -> list[str]:
    """Stream text published on IOPub until `until` (monotonic) or until `stop_text` shows."""
    texts = [] if texts is None else texts
    while time.monotonic() < until:
        try:
            msg = await kc.get_iopub_msg(timeout=0.5)
        except Exception:
            continue
        if msg["msg_type"] == "stream":
            texts.append(msg["content"]["text"])
            if stop_text and stop_text in "".join(texts):
                break
    return texts


async def _answers(kc, timeout: float = 90) -> None:
    """Wait until the kernel behind kc answers kernel_info on kc."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        msg_id = kc.kernel_info()
        t_end = time.monotonic() + 2
        while time.monotonic() < t_end:
            try:
                reply = await kc.get_shell_msg(timeout=0.5)
            except Exception:
                continue
            if reply["parent_header"].get("msg_id") == msg_id:
                return
    raise AssertionError("the kernel does not answer")


async def _dies(km, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while await km.is_alive():
        assert time.monotonic() < deadline, "the kernel did not die"
        await asyncio.sleep(0.1)


class Harness:
    def __init__(self, path: Path, workdir: Path, log: Path):
        self.nb = nbformat.read(path, as_version=4)
        self.workdir = workdir
        self.log = open(log, "ab")
        self.client = NotebookClient(self.nb, timeout=600, kernel_name=SPEC,
                                     resources={"metadata": {"path": str(workdir)}})
        self.extra_managers: list = []

    async def run(self) -> nbformat.NotebookNode:
        c = self.client
        c.km = AsyncKernelManager(kernel_name=SPEC)
        c.km.cache_ports = False
        async with c.async_setup_kernel(stdout=self.log, stderr=self.log):
            try:
                for i, cell in enumerate(self.nb.cells):
                    if cell.cell_type != "code":
                        continue
                    tags = set(cell.metadata.get("tags", []))
                    if "nbcheckpoint-kills-kernel" in tags:
                        await self.kill_and_restart(cell)
                    elif "nbcheckpoint-replaces-kernel" in tags:
                        await self.replaced_in_place(cell)
                    elif "nbcheckpoint-preempted" in tags:
                        await self.preempted(cell)
                    else:
                        await c.async_execute_cell(cell, i)
            finally:
                for km in self.extra_managers:
                    if await km.is_alive():
                        await km.shutdown_kernel(now=True)
        return self.nb

    async def kill_and_restart(self, cell) -> None:
        c = self.client
        c.kc.execute(cell.source)
        await _dies(c.km)
        c.kc.stop_channels()
        await c.km.restart_kernel(now=True)        # what Jupyter's restarter does
        await c.async_start_new_kernel_client()
        cell.outputs = _stream_output(["(the kernel died; Jupyter started a fresh one)\n"])

    async def replaced_in_place(self, cell) -> None:
        c = self.client
        mid = c.kc.execute(cell.source)
        # the %checkpoint pending in the image says "restored from ..." to this client, and
        # the restored kernel ends this %restore cell (its reply): wait for both, servicing
        # IOPub meanwhile, as a frontend does, before the next cell goes
        texts: list[str] = []
        deadline = time.monotonic() + 90
        replied = False
        while time.monotonic() < deadline and not (replied and "restored from" in "".join(texts)):
            await _collect(c.kc, time.monotonic() + 0.2, texts=texts)
            try:
                reply = await c.kc.get_shell_msg(timeout=0.05)
            except Exception:
                continue
            replied = replied or reply["parent_header"].get("msg_id") == mid
        assert replied, "the %restore cell never got its reply" + "".join(texts)
        cell.outputs = _stream_output(texts)

    async def preempted(self, cell) -> None:
        c = self.client
        c.kc.execute(cell.source)
        await _dies(c.km)
        c.kc.stop_channels()
        await c.km.shutdown_kernel(now=True)
        # the job runs again: a new manager starts the kernel from its latest checkpoint
        latest = Store().list()[0].name
        km = AsyncKernelManager(kernel_name=SPEC)
        km.cache_ports = False
        await km.start_kernel(stdout=self.log, stderr=self.log, cwd=str(self.workdir),
                              nbcheckpoint_restore=latest)
        self.extra_managers.append(km)
        kc = km.client()
        kc.start_channels()
        texts = await _collect(kc, time.monotonic() + 60, "restored from")
        await kc.wait_for_ready(timeout=60)
        c.kc = kc
        cell.outputs = _stream_output([f"(preempted; a new job started the kernel from {latest!r})\n"] + texts)


def execute(name: str, tmp_path: Path) -> nbformat.NotebookNode:
    work = tmp_path / "work"
    work.mkdir()
    h = Harness(NOTEBOOKS / name, work, tmp_path / "kernels.log")
    nb = asyncio.run(asyncio.wait_for(h.run(), 900))
    nbformat.write(nb, tmp_path / name)          # the executed notebook, for a look after a failure
    return nb


def outputs(nb) -> str:
    out = []
    for cell in nb.cells:
        for o in cell.get("outputs", []):
            if o.output_type == "stream":
                out.append(o.text)
            elif o.output_type in ("execute_result", "display_data"):
                out.append(o.data.get("text/plain", ""))
    return "\n".join(out)


def test_tutorial(tmp_path, store, monkeypatch):
    monkeypatch.setenv("TUTORIAL_ARRAY_BYTES", str(64 << 20))
    nb = execute("tutorial.ipynb", tmp_path)
    text = outputs(nb)
    for what in ("generator", "thread", "open file", "subprocess"):
        assert f"{what}: cannot be pickled" in text, text
    assert "saved 'tutorial'" in text, text
    assert "restored from 'tutorial'" in text and "on_restore: back from 'tutorial'" in text, text
    assert "generator continues with 25" in text and "thread alive and counting: True" in text, text
    assert "the child says STILL THERE?" in text and "big intact: True" in text, text
    assert "all intact" in text, text
    assert (tmp_path / "work" / "tutorial-journal.txt").read_text().splitlines()[-1] == \
        "line 3: written after the restore"


def test_hpc(tmp_path, store, monkeypatch):
    monkeypatch.setenv("HPC_GRID", "128")
    nb = execute("hpc.ipynb", tmp_path)
    text = outputs(nb)
    assert f"checkpoints go to {store.root}" in text, text
    assert "saved 'hpc-demo'" in text and "in its own PID namespace" in text, text
    assert "preempted; a new job started the kernel from 'hpc-demo'" in text, text
    assert "restored from 'hpc-demo'" in text, text
    assert "resuming at step 200" in text, text
    assert [c.name for c in store.list()] == ["hpc-demo"]
