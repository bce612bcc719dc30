"""%checkpoints: an ipywidgets browser of the checkpoint store.

One row per checkpoint (newest first): name, when it was taken, size on disk, how long
the kernel was paused and how long it took in all, notebook and cell, lineage and
parent; a Restore and a Delete button per row; a progress bar while an operation runs;
Refresh.  The last browser shown is ``nbcheckpoint.kernel.browser.last``, and its rows
``last.rows[NAME].restore`` / ``.delete`` are the buttons (``.click()`` works from code).
"""
from __future__ import annotations

import html

import ipywidgets as W

from ..engine.units import format_size
from ..store import Store, StoreError
from .messages import CheckpointError, helper_restore_message
from .progress import describe, format_time

last: "Browser | None" = None

COLUMNS = ("name", "taken", "size", "paused / total", "notebook [cell]", "lineage / parent", "", "")
GRID = "minmax(8em,1.5fr) 11em 6em 8em minmax(8em,1.5fr) minmax(8em,1fr) 6em 6em"


class Row:
    def __init__(self, browser: "Browser", ck):
        self.name = ck.name
        m = ck.meta
        times = " / ".join(f"{t:.1f} s" if isinstance(t, (int, float)) else "?"
                           for t in (m.get("frozen_s"), m.get("total_s")))
        nb = m.get("notebook") or ""
        if m.get("execution_count") is not None:
            nb = f"{nb} [{m['execution_count']}]".strip()
        lin = " / ".join(x for x in ((m.get("lineage") or "")[:8], m.get("parent")) if x) or "-"
        self.cells = [W.HTML(f"<b>{html.escape(ck.name)}</b>"),
                      W.HTML(html.escape(format_time(m.get("created")))),
                      W.HTML(format_size(m.get("size_bytes"))),
                      W.HTML(times), W.HTML(html.escape(nb or "-")), W.HTML(html.escape(lin))]
        self.restore = W.Button(description="Restore", button_style="warning",
                                tooltip=f"replace this kernel by '{ck.name}'",
                                layout=W.Layout(width="6em"))
        self.delete = W.Button(description="Delete", button_style="danger",
                               tooltip=f"delete '{ck.name}' from the store", layout=W.Layout(width="6em"))
        if browser.side.mode != "shim":
            self.restore.tooltip = "needs the \"Python 3 (checkpointable)\" kernel"
        self.restore.on_click(lambda _b: browser.restore(self.name))
        self.delete.on_click(lambda _b: browser.delete(self.name))

    def widgets(self):
        return self.cells + [self.restore, self.delete]


class Browser:
    def __init__(self, side, store=None):
        global last
        self.side = side
        self._store = store
        self.rows: dict[str, Row] = {}
        self.title = W.HTML()
        self.refresh_button = W.Button(description="Refresh", icon="refresh", layout=W.Layout(width="8em"))
        self.refresh_button.on_click(lambda _b: self.refresh())
        self.progress = W.FloatProgress(value=0.0, min=0.0, max=1.0, layout=W.Layout(visibility="hidden"))
        self.status = W.HTML()
        self.message = ""
        self.grid = W.GridBox(layout=W.Layout(grid_template_columns=GRID, grid_gap="2px 8px"))
        self.widget = W.VBox([W.HBox([self.title, self.refresh_button]), self.grid,
                              W.HBox([self.progress, self.status])])
        self.refresh()
        last = self

    @property
    def store(self):
        return self._store or Store()

    # ------------------------------------------------------------------ display

    def _repr_mimebundle_(self, **kw):
        return self.widget._repr_mimebundle_(**kw)

    def refresh(self) -> None:
        store = self.store
        try:
            cks = store.list()
        except OSError as e:
            cks = []
            self.say(f"cannot read {store.root}: {e}", error=True)
        self.rows = {c.name: Row(self, c) for c in cks}
        header = [W.HTML(f"<b>{h}</b>") for h in COLUMNS]
        cells = header + [w for r in self.rows.values() for w in r.widgets()]
        self.grid.children = cells
        n = len(self.rows)
        self.title.value = (f"<b>{n} checkpoint{'s' if n != 1 else ''}</b> in "
                            f"<code>{html.escape(str(store.root))}</code>")

    def say(self, text: str, error: bool = False) -> None:
        self.message = text                 # the status line as plain text
        color = "#c00" if error else "inherit"
        self.status.value = f'<span style="color:{color}">{html.escape(text)}</span>'

    # ------------------------------------------------------------------ operations

    def _progress(self, phase, done, total):
        text, frac = describe(phase, done, total)
        self.progress.value = frac if frac is not None else 0.0
        self.progress.bar_style = "" if frac is not None else "info"
        self.say(text)

    def _busy(self, on: bool) -> None:
        self.progress.layout.visibility = "visible" if on else "hidden"
        self.progress.value = 0.0
        for r in self.rows.values():
            r.restore.disabled = r.delete.disabled = on
        self.refresh_button.disabled = on

    def restore(self, name: str) -> None:
        if self.side.mode != "shim":
            self.say(helper_restore_message(name), error=True)
            return
        self._busy(True)
        self.say(f"restoring '{name}': this kernel will be replaced")
        try:
            self.side.restore(name, quiet=True, progress=self._progress)
        except CheckpointError as e:
            self.say(str(e), error=True)
        finally:
            self._busy(False)

    def delete(self, name: str) -> None:
        self._busy(True)
        try:
            self.store.delete(name)
            self.say(f"deleted '{name}'")
        except (StoreError, OSError) as e:
            self.say(str(e), error=True)
        finally:
            self._busy(False)
            self.refresh()
