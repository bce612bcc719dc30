"""Jupyter server extension: the REST API behind the JupyterLab buttons (docs/jupyter.md).

Enabled by jupyter-config/jupyter_server_config.d/nbcheckpoint.json, which pip installs
into <prefix>/etc/jupyter.  Endpoints, under <base_url>/nbcheckpoint/api/:

    GET    checkpoints[?kernel_id=&notebook=&lineage=]   list (newest first)
    GET    checkpoints/NAME                               one checkpoint's metadata
    DELETE checkpoints/NAME
    POST   kernels/KERNEL_ID/checkpoint  {name?, notebook?, execution_count?}
    POST   kernels/KERNEL_ID/restore     {name, session_id?, path?}
    POST   restore                       {name, session_id?, path?}   (always a new kernel)
    GET    kernels/KERNEL_ID/status      what the kernel's shim knows (KERNEL_STATUS)

Every handler is an APIHandler (token or cookie auth; XSRF enforced for cookies) with
@web.authenticated and @authorized on the resource "nbcheckpoint".  Errors are JSON
{"message": ...} with the message meant for the user.  Metadata goes out without the
kernel's HMAC key.
"""
from __future__ import annotations

import asyncio
import functools
import json
import posixpath
import re

from jupyter_client.kernelspec import NoSuchKernel
from jupyter_core.utils import ensure_async
from jupyter_server.auth.decorator import authorized
from jupyter_server.base.handlers import APIHandler
from jupyter_server.utils import url_path_join
from tornado import web

from ..control import Busy
from ..engine.errors import RestoreError
from ..store import BadName, NoSuchCheckpoint, Store, StoreError, public_meta

AUTH_RESOURCE = "nbcheckpoint"
API_PREFIX = "nbcheckpoint/api"
DEFAULT_KERNEL_NAME = "python3-checkpointable"
RESTORE_TIMEOUT = 600            # s: a restore into a new kernel must be confirmed by then
MAX_BODY = 64 << 10              # bytes: every body the API takes is a few short strings
# the optional fields of request bodies: their type, and how to say it
FIELDS = {"session_id": (str, "a string"), "path": (str, "a string (the notebook's path)"),
          "notebook": (str, "a string (the notebook's path)"), "execution_count": (int, "an integer")}
_UUID = re.compile(r"[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}")
# the HTTP status of the project's errors (the first type that matches); any other error: 500
STATUSES = ((BadName, 400), (NoSuchCheckpoint, 404), (StoreError, 409), (Busy, 409), (RestoreError, 409))
# what a client sees of the shim's status answer: not its pids, nor the store's path on the server
KERNEL_STATUS = ("busy", "starting", "restored_from", "lineage", "parent")


def _jupyter_server_extension_points():
    return [{"module": "nbcheckpoint.jupyter.serverext"}]


class ApiError(Exception):
    """An answer other than success: HTTP status and the message for the user."""

    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status
        self.message = message


def check_kernel_id(kernel_id: str) -> str:
    if not isinstance(kernel_id, str) or not _UUID.fullmatch(kernel_id):
        raise ApiError(400, f"bad kernel id {kernel_id!r}: a kernel id is a UUID "
                            "like 0f8a4c2e-1b2c-4d5e-8f90-123456789abc")
    return kernel_id


def check_name(name) -> str:
    if name is None or name == "":
        raise ApiError(400, "a checkpoint name is required")
    return Store.validate_name(name)


def _errors(method):
    """Turn ApiError and any other error into a JSON {"message"} answer (STATUSES)."""
    @functools.wraps(method)
    async def inner(self, *args, **kwargs):
        try:
            return await method(self, *args, **kwargs)
        except ApiError as e:
            self._fail(e.status, e.message)
        except web.HTTPError:
            raise
        except Exception as e:                   # the provisioner's, store's or engine's own words
            status = next((s for t, s in STATUSES if isinstance(e, t)), 500)
            if status == 500:
                self.log.exception("nbcheckpoint: %s %s failed", self.request.method, self.request.path)
            self._fail(status, str(e) or type(e).__name__)
    return inner


class BaseHandler(APIHandler):
    auth_resource = AUTH_RESOURCE

    @property
    def store(self) -> Store:
        return Store(self.settings.get("nbcheckpoint_dir") or None)

    def _fail(self, status: int, message: str) -> None:
        self.log.warning("nbcheckpoint: %s %s -> %d: %s", self.request.method,
                         self.request.path, status, message)
        self.clear()
        self.reply({"message": message}, status)

    def body(self, *optional: str) -> dict:
        """The request's JSON object, each of its OPTIONAL fields (FIELDS) null or of its type:
        the whole request is checked before anything is done."""
        raw = self.request.body
        if len(raw) > MAX_BODY:
            raise ApiError(400, f"the request body is too large (at most {MAX_BODY} bytes)")
        try:
            data = json.loads(raw) if raw else {}
        except (ValueError, RecursionError):           # RecursionError: nested too deep
            raise ApiError(400, "the request body is not JSON (or nested too deep)") from None
        if not isinstance(data, dict):
            raise ApiError(400, "the request body must be a JSON object")
        for k in optional:
            t, what = FIELDS[k]
            v = data.get(k)
            if v is not None and (not isinstance(v, t) or isinstance(v, bool)):
                raise ApiError(400, f"{k} must be {what}")
        return data

    def reply(self, data, status: int = 200) -> None:
        self.set_status(status)
        self.set_header("Content-Type", "application/json")
        self.finish(json.dumps(data))

    def checkpoint_or_404(self, name: str):
        return self.store.get(check_name(name))

    def existing_kernel(self, kernel_id: str):
        check_kernel_id(kernel_id)
        if kernel_id not in self.kernel_manager:
            raise ApiError(404, f"no kernel {kernel_id} on this server (it was shut down or never existed)")
        return self.kernel_manager.get_kernel(kernel_id)

    @staticmethod
    def is_checkpointable(km) -> bool:
        prov = getattr(km, "provisioner", None)
        return prov is not None and callable(getattr(prov, "checkpoint", None)) \
            and callable(getattr(prov, "restore_in_place", None))

    def require_checkpointable(self, kernel_id: str, km, cannot: str) -> None:
        if not self.is_checkpointable(km):
            raise ApiError(409, f"kernel {kernel_id} ({getattr(km, 'kernel_name', '?')}) {cannot}: "
                                "it was not started with a checkpointable kernelspec; "
                                "switch the notebook to 'Python 3 (checkpointable)'")

    async def session_for(self, *, session_id=None, path=None, kernel_id=None) -> dict | None:
        """The session named by id, else the one of notebook PATH, else the one using KERNEL_ID."""
        sm = self.session_manager
        if session_id:
            try:
                return await sm.get_session(session_id=session_id)
            except web.HTTPError:                  # gone, or went away with its kernel
                pass
        for s in await sm.list_sessions():
            if path and s.get("path") == path:
                return s
        if kernel_id:
            for s in await sm.list_sessions():
                if (s.get("kernel") or {}).get("id") == kernel_id:
                    return s
        return None


class CheckpointsHandler(BaseHandler):
    @web.authenticated
    @authorized
    @_errors
    async def get(self):
        wanted = {k: self.get_query_argument(k, None) for k in ("kernel_id", "notebook", "lineage")}
        if wanted["kernel_id"] is not None:
            check_kernel_id(wanted["kernel_id"])
        cks = await asyncio.to_thread(self.store.list)
        self.reply([public_meta(dict(ck.meta, name=ck.name)) for ck in cks
                    if all(v is None or ck.meta.get(k) == v for k, v in wanted.items())])


class CheckpointHandler(BaseHandler):
    @web.authenticated
    @authorized
    @_errors
    async def get(self, name):
        ck = self.checkpoint_or_404(name)
        self.reply(public_meta(dict(ck.meta, name=ck.name)))

    @web.authenticated
    @authorized
    @_errors
    async def delete(self, name):
        self.checkpoint_or_404(name)
        await asyncio.to_thread(self.store.delete, name)
        self.set_status(204)
        self.finish()


class KernelCheckpointHandler(BaseHandler):
    @web.authenticated
    @authorized
    @_errors
    async def post(self, kernel_id):
        body = self.body("notebook", "execution_count")
        km = self.existing_kernel(kernel_id)
        name = body.get("name")
        if name is not None:
            check_name(name)
        self.require_checkpointable(kernel_id, km, "cannot be checkpointed")
        notebook, count = body.get("notebook"), body.get("execution_count")
        if notebook is None:
            s = await self.session_for(kernel_id=kernel_id)
            notebook = s.get("path") if s else None
        kwargs = {"name": name, "notebook": notebook}
        if count is not None:
            kwargs["execution_count"] = count
        meta = await km.provisioner.checkpoint(**kwargs)
        self.reply(public_meta(meta))


class KernelStatusHandler(BaseHandler):
    @web.authenticated
    @authorized
    @_errors
    async def get(self, kernel_id):
        km = self.existing_kernel(kernel_id)
        self.require_checkpointable(kernel_id, km, "has no checkpoint status")
        if not await ensure_async(km.is_alive()):
            raise ApiError(409, f"kernel {kernel_id} is not running (it died, or is being restarted)")
        st = await km.provisioner.status()
        self.reply({k: st.get(k) for k in KERNEL_STATUS})


class RestoreMixin:
    async def confirm_restored(self, kernel_id: str, name: str) -> None:
        """The kernel started from NAME really is NAME: its shim says so once the restore is
        done.  Otherwise (the restore failed and the shim exited, or the restarter already
        put a fresh kernel in its place) it is shut down and the request fails, rather than
        handing the notebook an empty kernel."""
        mkm = self.kernel_manager
        prov = getattr(mkm.get_kernel(kernel_id), "provisioner", None)
        if prov is None or not callable(getattr(prov, "status", None)):
            return
        try:
            st = await asyncio.wait_for(prov.status(), RESTORE_TIMEOUT)
            why = f"it runs {st.get('restored_from')!r}" if st.get("restored_from") else "it started empty"
        except Exception as e:                    # the shim is gone, or never answered
            self.log.warning("nbcheckpoint: no status from kernel %s: %s", kernel_id, e)
            st, why = {}, "the kernel exited before it came up"
        if st.get("restored_from") == name:
            return
        self.log.warning("nbcheckpoint: kernel %s is not restored from %s (%s): shutting it down",
                         kernel_id, name, why)
        try:
            await mkm.shutdown_kernel(kernel_id, now=True)
        except Exception:
            self.log.exception("nbcheckpoint: shutting down kernel %s", kernel_id)
        raise ApiError(500, f"restoring checkpoint {name!r} into a new kernel failed ({why}); the "
                            "Jupyter server's log has the reason nbcheckpoint's shim gave")

    async def restore_new_kernel(self, name: str, ck, body: dict, old_kernel_id: str | None):
        """Start a kernel from checkpoint NAME; move the notebook's session to it."""
        meta = ck.meta
        kernel_name = meta.get("kernel_name") or DEFAULT_KERNEL_NAME
        path = body.get("path")
        session = await self.session_for(session_id=body.get("session_id"), path=path,
                                         kernel_id=old_kernel_id)
        nb_path = (session or {}).get("path") or path or meta.get("notebook")
        cwd = posixpath.dirname(nb_path) if nb_path else None
        mkm = self.kernel_manager
        try:
            new_id = await mkm.start_kernel(kernel_name=kernel_name, path=cwd,
                                            nbcheckpoint_restore=name)
        except NoSuchKernel:
            raise ApiError(409, f"checkpoint {name!r} was taken from a kernel of kernelspec "
                                f"{kernel_name!r}, which this server does not have") from None
        await self.confirm_restored(new_id, name)
        switched = None
        if session is not None:
            old = (session.get("kernel") or {}).get("id")
            await self.session_manager.update_session(session["id"], kernel_id=new_id)
            switched = session["id"]
            # As a session PATCH does: the kernel the notebook left is shut down, unless
            # another session still uses it.
            if old and old != new_id and old in mkm:
                others = [s for s in await self.session_manager.list_sessions()
                          if (s.get("kernel") or {}).get("id") == old]
                if not others:
                    self.log.info("nbcheckpoint: shutting down kernel %s, replaced by %s", old, new_id)
                    await mkm.shutdown_kernel(old)
        self.log.info("nbcheckpoint: restored %s into new kernel %s (session %s)", name, new_id, switched)
        return {"kernel_id": new_id, "in_place": False, "session_id": switched,
                "checkpoint": public_meta(dict(meta, name=name))}


class KernelRestoreHandler(RestoreMixin, BaseHandler):
    @web.authenticated
    @authorized("execute")
    @_errors
    async def post(self, kernel_id):
        check_kernel_id(kernel_id)
        body = self.body("session_id", "path")
        name = check_name(body.get("name"))
        ck = self.checkpoint_or_404(name)
        mkm = self.kernel_manager
        if kernel_id in mkm:
            km = mkm.get_kernel(kernel_id)
            if self.is_checkpointable(km) and await ensure_async(km.is_alive()):
                meta = await km.provisioner.restore_in_place(name)
                self.log.info("nbcheckpoint: restored %s in place into kernel %s", name, kernel_id)
                s = await self.session_for(session_id=body.get("session_id"), kernel_id=kernel_id)
                self.reply({"kernel_id": kernel_id, "in_place": True,
                            "session_id": s["id"] if s else None,
                            "checkpoint": public_meta(dict(meta or ck.meta, name=name))})
                return
        self.reply(await self.restore_new_kernel(name, ck, body, kernel_id))


class RestoreHandler(RestoreMixin, BaseHandler):
    @web.authenticated
    @authorized("execute")
    @_errors
    async def post(self):
        body = self.body("session_id", "path")
        name = check_name(body.get("name"))
        ck = self.checkpoint_or_404(name)
        self.reply(await self.restore_new_kernel(name, ck, body, None))


def _checkpoint_dir(serverapp) -> str | None:
    """The provisioner's checkpoint_dir when the server's config sets it, so both agree."""
    try:
        section = serverapp.config.get("CheckpointableProvisioner") or {}
        value = section.get("checkpoint_dir") if hasattr(section, "get") else None
    except Exception:
        value = None
    return value or None


def _load_jupyter_server_extension(serverapp):
    base = url_path_join(serverapp.web_app.settings["base_url"], API_PREFIX)
    name = r"(?P<name>[^/]+)"
    kid = r"(?P<kernel_id>[^/]+)"
    handlers = [
        (url_path_join(base, "checkpoints"), CheckpointsHandler),
        (url_path_join(base, "checkpoints", name), CheckpointHandler),
        (url_path_join(base, "kernels", kid, "checkpoint"), KernelCheckpointHandler),
        (url_path_join(base, "kernels", kid, "restore"), KernelRestoreHandler),
        (url_path_join(base, "kernels", kid, "status"), KernelStatusHandler),
        (url_path_join(base, "restore"), RestoreHandler),
    ]
    serverapp.web_app.settings["nbcheckpoint_dir"] = _checkpoint_dir(serverapp)
    serverapp.web_app.add_handlers(".*$", handlers)
    serverapp.log.info("nbcheckpoint: REST API at %s (checkpoints in %s)", base,
                       Store(serverapp.web_app.settings["nbcheckpoint_dir"]).root)


# The name older servers (jupyter_server < 2 / notebook) look for.
load_jupyter_server_extension = _load_jupyter_server_extension
