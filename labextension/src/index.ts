// JupyterLab toolbar buttons for nbcheckpoint: "Checkpoint" saves the notebook's kernel
// (process-level, through the server extension nbcheckpoint/jupyter/serverext.py) and
// "Restore…" brings one back, into the same kernel when it is still there, else into a
// new kernel that the notebook then uses.  REST API: docs/jupyter.md.

import {
  JupyterFrontEnd,
  JupyterFrontEndPlugin
} from '@jupyterlab/application';
import {
  Dialog,
  Notification,
  ToolbarButton,
  showDialog
} from '@jupyterlab/apputils';
import { URLExt } from '@jupyterlab/coreutils';
import { DocumentRegistry } from '@jupyterlab/docregistry';
import {
  INotebookModel,
  INotebookTracker,
  NotebookPanel
} from '@jupyterlab/notebook';
import { ServerConnection, Session } from '@jupyterlab/services';
import { DisposableDelegate, IDisposable } from '@lumino/disposable';
import { Widget } from '@lumino/widgets';

const PLUGIN_ID = 'nbcheckpoint:plugin';
const API = 'nbcheckpoint/api';

/** The fields of a checkpoint's metadata that the server returns (docs/jupyter.md). */
export interface ICheckpoint {
  name: string;
  created: number;
  kernel_id?: string | null;
  kernel_name?: string | null;
  notebook?: string | null;
  execution_count?: number | null;
  size_bytes?: number | null;
  frozen_s?: number | null;
  total_s?: number | null;
  lineage?: string | null;
  hostname?: string | null;
  [key: string]: unknown;
}

export interface IRestoreReply {
  kernel_id: string;
  in_place: boolean;
  session_id: string | null;
  checkpoint: ICheckpoint;
}

/** An error answered by the server: `message` is the server's message for the user. */
class APIError extends Error {}

async function requestAPI<T>(path: string, init: RequestInit = {}): Promise<T> {
  const settings = ServerConnection.makeSettings();
  const url = URLExt.join(settings.baseUrl, API, path);
  let response: Response;
  try {
    // makeRequest adds the XSRF token and the authorization the server expects.
    response = await ServerConnection.makeRequest(url, init, settings);
  } catch (error) {
    throw new APIError(`cannot reach the Jupyter server: ${error}`);
  }
  const text = await response.text();
  let data: any = null;
  if (text.length) {
    try {
      data = JSON.parse(text);
    } catch {
      data = null;
    }
  }
  if (!response.ok) {
    const message =
      (data && typeof data.message === 'string' && data.message) ||
      `${response.status} ${response.statusText}`;
    throw new APIError(message);
  }
  return data as T;
}

function post<T>(path: string, body: unknown): Promise<T> {
  return requestAPI<T>(path, { method: 'POST', body: JSON.stringify(body) });
}

export function formatSize(bytes: number | null | undefined): string {
  if (bytes === null || bytes === undefined) {
    return '? B';
  }
  const units = ['B', 'KB', 'MB', 'GB', 'TB'];
  let value = bytes;
  let unit = 0;
  while (value >= 1000 && unit < units.length - 1) {
    value /= 1000;
    unit += 1;
  }
  return `${unit === 0 ? value : value.toFixed(1)} ${units[unit]}`;
}

function formatSeconds(s: number | null | undefined): string {
  if (s === null || s === undefined) {
    return '?';
  }
  return s < 10 ? `${s.toFixed(2)} s` : `${s.toFixed(1)} s`;
}

function formatCreated(created: number): string {
  return new Date(created * 1000).toLocaleString();
}

function errorMessage(error: unknown): string {
  return error instanceof Error ? error.message : String(error);
}

/** The id of the kernel the notebook uses now, or null. */
function currentKernelId(panel: NotebookPanel): string | null {
  return panel.sessionContext.session?.kernel?.id ?? null;
}

/** The highest execution count in the notebook: where the kernel's counter is. */
function lastExecutionCount(panel: NotebookPanel): number | null {
  const cells = panel.content.model?.cells;
  let last: number | null = null;
  if (!cells) {
    return null;
  }
  for (let i = 0; i < cells.length; i++) {
    const cell = cells.get(i) as unknown as { executionCount?: number | null };
    const n = cell.executionCount;
    if (typeof n === 'number' && (last === null || n > last)) {
      last = n;
    }
  }
  return last;
}

/** Checkpoint the notebook's kernel, with a toast saying how it went. */
export async function checkpointNotebook(
  panel: NotebookPanel
): Promise<ICheckpoint | null> {
  const kernelId = currentKernelId(panel);
  if (!kernelId) {
    Notification.error(
      'nbcheckpoint: this notebook has no running kernel to checkpoint',
      { autoClose: 8000 }
    );
    return null;
  }
  const pending = Notification.emit(
    'nbcheckpoint: checkpointing the kernel…',
    'in-progress',
    { autoClose: false }
  );
  try {
    const meta = await post<ICheckpoint>(
      `kernels/${encodeURIComponent(kernelId)}/checkpoint`,
      {
        notebook: panel.context.path,
        execution_count: lastExecutionCount(panel)
      }
    );
    Notification.dismiss(pending);
    const frozen =
      meta.frozen_s !== null && meta.frozen_s !== undefined
        ? `, kernel paused ${formatSeconds(meta.frozen_s)}`
        : '';
    Notification.success(
      `Checkpoint "${meta.name}" saved: ${formatSize(meta.size_bytes)} in ` +
        `${formatSeconds(meta.total_s)}${frozen} (${formatCreated(meta.created)})`,
      { autoClose: 8000 }
    );
    return meta;
  } catch (error) {
    Notification.dismiss(pending);
    Notification.error(`Checkpoint failed: ${errorMessage(error)}`, {
      autoClose: false
    });
    return null;
  }
}

/** The body of the restore dialog: one radio button per checkpoint. */
class CheckpointList extends Widget implements Dialog.IBodyWidget<string | null> {
  constructor(mine: ICheckpoint[], others: ICheckpoint[]) {
    super();
    this.addClass('jp-nbcheckpoint-list');
    const node = this.node;
    if (!mine.length && !others.length) {
      const p = document.createElement('p');
      p.textContent =
        'There are no checkpoints yet: click "Checkpoint" in the notebook toolbar to take one.';
      node.appendChild(p);
      return;
    }
    const table = document.createElement('table');
    const head = document.createElement('tr');
    for (const title of ['', 'Name', 'Taken', 'Size', 'Notebook', 'Cell']) {
      const th = document.createElement('th');
      th.textContent = title;
      head.appendChild(th);
    }
    table.appendChild(head);
    const addRow = (cp: ICheckpoint, other: boolean) => {
      const tr = document.createElement('tr');
      tr.dataset.name = cp.name;
      if (other) {
        tr.classList.add('jp-nbcheckpoint-other');
      }
      const radioCell = document.createElement('td');
      const radio = document.createElement('input');
      radio.type = 'radio';
      radio.name = 'nbcheckpoint-choice';
      radio.value = cp.name;
      radio.id = `nbcheckpoint-choice-${cp.name}`;
      radio.setAttribute('aria-label', cp.name);
      radioCell.appendChild(radio);
      tr.appendChild(radioCell);
      const cells = [
        cp.name,
        formatCreated(cp.created),
        formatSize(cp.size_bytes),
        cp.notebook || '',
        cp.execution_count !== null && cp.execution_count !== undefined
          ? `[${cp.execution_count}]`
          : ''
      ];
      cells.forEach((text, i) => {
        const td = document.createElement('td');
        if (i === 0) {
          const label = document.createElement('label');
          label.htmlFor = radio.id;
          label.textContent = text;
          td.appendChild(label);
        } else {
          td.textContent = text;
        }
        tr.appendChild(td);
      });
      tr.addEventListener('click', () => {
        radio.checked = true;
      });
      table.appendChild(tr);
      this._radios.push(radio);
    };
    mine.forEach(cp => addRow(cp, false));
    others.forEach(cp => addRow(cp, true));
    node.appendChild(table);
    if (mine.length && others.length) {
      const toggle = document.createElement('label');
      toggle.className = 'jp-nbcheckpoint-toggle';
      const box = document.createElement('input');
      box.type = 'checkbox';
      box.addEventListener('change', () => {
        node.classList.toggle('jp-nbcheckpoint-showall', box.checked);
      });
      toggle.appendChild(box);
      toggle.appendChild(
        document.createTextNode(
          ` Show the checkpoints of other notebooks (${others.length})`
        )
      );
      node.appendChild(toggle);
    } else if (!mine.length) {
      // Nothing of this notebook's: show everything.
      node.classList.add('jp-nbcheckpoint-showall');
    }
    if (this._radios.length) {
      this._radios[0].checked = true;
    }
  }

  getValue(): string | null {
    const chosen = this._radios.find(r => r.checked);
    return chosen ? chosen.value : null;
  }

  private _radios: HTMLInputElement[] = [];
}

/**
 * Ask which checkpoint to restore and restore it into the notebook's kernel, or into a
 * new kernel that the notebook then uses.
 */
export async function restoreNotebook(
  panel: NotebookPanel,
  sessions: Session.IManager
): Promise<IRestoreReply | null> {
  const kernelId = currentKernelId(panel);
  let all: ICheckpoint[];
  try {
    all = await requestAPI<ICheckpoint[]>('checkpoints');
  } catch (error) {
    Notification.error(
      `Cannot list the checkpoints: ${errorMessage(error)}`,
      { autoClose: false }
    );
    return null;
  }
  const path = panel.context.path;
  const isMine = (cp: ICheckpoint) =>
    (kernelId !== null && cp.kernel_id === kernelId) || cp.notebook === path;
  const mine = all.filter(isMine);
  const others = all.filter(cp => !isMine(cp));
  const body = new CheckpointList(mine, others);
  const result = await showDialog({
    title: 'Restore a checkpoint',
    body,
    buttons: all.length
      ? [Dialog.cancelButton(), Dialog.okButton({ label: 'Restore' })]
      : [Dialog.okButton({ label: 'Close' })]
  });
  const name = result.value;
  if (!result.button.accept || !all.length || !name) {
    return null;
  }

  const session = panel.sessionContext.session;
  const pending = Notification.emit(
    `nbcheckpoint: restoring "${name}"…`,
    'in-progress',
    { autoClose: false }
  );
  let reply: IRestoreReply;
  try {
    const request = { name, session_id: session?.id ?? null, path };
    reply = kernelId
      ? await post<IRestoreReply>(
          `kernels/${encodeURIComponent(kernelId)}/restore`,
          request
        )
      : await post<IRestoreReply>('restore', request);
  } catch (error) {
    Notification.dismiss(pending);
    Notification.error(`Restore failed: ${errorMessage(error)}`, {
      autoClose: false
    });
    return null;
  }

  if (!reply.in_place) {
    try {
      // The server switched this notebook's session to the new kernel when the session
      // still existed; refreshing makes the frontend see that now (and forget a session
      // that went away with its kernel).  Otherwise attach the notebook to the kernel.
      await sessions.refreshRunning();
      if (currentKernelId(panel) !== reply.kernel_id) {
        await panel.sessionContext.changeKernel({ id: reply.kernel_id });
      }
    } catch (error) {
      Notification.dismiss(pending);
      Notification.error(
        `Checkpoint "${name}" was restored into kernel ${reply.kernel_id}, but this ` +
          `notebook could not switch to it: ${errorMessage(error)}`,
        { autoClose: false }
      );
      return reply;
    }
  }
  Notification.dismiss(pending);
  const where = reply.in_place ? 'into this kernel' : 'into a new kernel';
  Notification.success(
    `Restored "${name}" ${where} (taken ${formatCreated(reply.checkpoint.created)})`,
    { autoClose: 8000 }
  );
  return reply;
}

/** Adds the two buttons to every notebook's toolbar. */
class ToolbarButtons
  implements DocumentRegistry.IWidgetExtension<NotebookPanel, INotebookModel>
{
  constructor(private _sessions: Session.IManager) {}

  createNew(panel: NotebookPanel): IDisposable {
    const checkpoint = new ToolbarButton({
      className: 'jp-nbcheckpoint-checkpoint',
      label: 'Checkpoint',
      tooltip:
        "Save the kernel's whole state (memory, threads, open files) as a checkpoint",
      onClick: () => void checkpointNotebook(panel)
    });
    const restore = new ToolbarButton({
      className: 'jp-nbcheckpoint-restore',
      label: 'Restore…',
      tooltip: 'Bring back the kernel from a checkpoint',
      onClick: () => void restoreNotebook(panel, this._sessions)
    });
    const toolbar = panel.toolbar;
    if (!toolbar.insertAfter('cellType', 'nbcheckpoint-checkpoint', checkpoint)) {
      toolbar.insertItem(10, 'nbcheckpoint-checkpoint', checkpoint);
    }
    toolbar.insertAfter('nbcheckpoint-checkpoint', 'nbcheckpoint-restore', restore);
    return new DisposableDelegate(() => {
      checkpoint.dispose();
      restore.dispose();
    });
  }
}

const plugin: JupyterFrontEndPlugin<void> = {
  id: PLUGIN_ID,
  description:
    'Checkpoint and restore buttons in the notebook toolbar (process-level kernel checkpoints)',
  autoStart: true,
  requires: [INotebookTracker],
  activate: (app: JupyterFrontEnd, tracker: INotebookTracker) => {
    const sessions = app.serviceManager.sessions;
    app.docRegistry.addWidgetExtension('Notebook', new ToolbarButtons(sessions));
    app.commands.addCommand('nbcheckpoint:checkpoint', {
      label: 'Checkpoint the kernel',
      isEnabled: () => tracker.currentWidget !== null,
      execute: () =>
        tracker.currentWidget ? checkpointNotebook(tracker.currentWidget) : null
    });
    app.commands.addCommand('nbcheckpoint:restore', {
      label: 'Restore the kernel from a checkpoint…',
      isEnabled: () => tracker.currentWidget !== null,
      execute: () =>
        tracker.currentWidget
          ? restoreNotebook(tracker.currentWidget, sessions)
          : null
    });
  }
};

export default plugin;
