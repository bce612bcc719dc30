"""What pyproject.toml cannot say: the JupyterLab extension is built from labextension/
(TypeScript) by npm and jupyter_builder while the package is built, and installed as
share/jupyter/labextensions/<name>/ - for `pip install .` (wheel) and `pip install -e .`
alike.  Everything else (metadata, the kernelspec and server-extension config as data
files) is in pyproject.toml.

The build runs only when labextension/build/ is missing or was built from other sources
(a hash of the sources is kept next to the output), so a second install costs nothing.
NBCHECKPOINT_SKIP_LABEXTENSION=1 installs without the JupyterLab button (no Node.js needed).
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

from setuptools import Command, setup
from setuptools.command.build import build
from setuptools.dist import Distribution

HERE = Path(__file__).resolve().parent
LABEXT = HERE / "labextension"
OUTPUT = LABEXT / "build"                      # package.json "jupyterlab.outputDir"
STAMP = OUTPUT / ".nbcheckpoint-sources"       # hash of the sources OUTPUT was built from
NPM_STAMP = LABEXT / "node_modules" / ".nbcheckpoint-lock"
SOURCES = ["package.json", "package-lock.json", "tsconfig.json", "src", "style"]


def _digest(paths) -> str:
    h = hashlib.sha256()
    for rel in paths:
        p = LABEXT / rel
        files = sorted(f for f in p.rglob("*") if f.is_file()) if p.is_dir() else [p]
        for f in files:
            if f.exists():
                h.update(str(f.relative_to(LABEXT)).encode() + b"\0" + f.read_bytes() + b"\0")
    return h.hexdigest()


def _run(cmd, **kw):
    print("nbcheckpoint: $", " ".join(str(c) for c in cmd), flush=True)
    subprocess.check_call([str(c) for c in cmd], cwd=LABEXT, **kw)


class build_labextension(Command):
    description = "build the JupyterLab extension in labextension/ when missing or stale"
    user_options = []

    def initialize_options(self):
        pass

    def finalize_options(self):
        pass

    def run(self):
        if os.environ.get("NBCHECKPOINT_SKIP_LABEXTENSION"):
            print("nbcheckpoint: NBCHECKPOINT_SKIP_LABEXTENSION is set: "
                  "installing without the JupyterLab extension", flush=True)
            return
        have_sources = (LABEXT / "src").is_dir()
        if have_sources:
            digest = _digest(SOURCES)
            if not (STAMP.exists() and STAMP.read_text() == digest):
                self._build(digest)
        if not (OUTPUT / "package.json").exists():
            raise SystemExit("nbcheckpoint: the JupyterLab extension is neither built nor "
                             "buildable here (labextension/src is missing)")
        self._add_data_files()

    def _build(self, digest: str):
        npm = shutil.which("npm")
        if not npm or not shutil.which("node"):
            raise SystemExit(
                "nbcheckpoint: building the JupyterLab extension needs Node.js (>= 20.19) and "
                "npm on PATH; install them, or set NBCHECKPOINT_SKIP_LABEXTENSION=1 to install "
                "without the JupyterLab toolbar button")
        lock = _digest(["package.json", "package-lock.json"])
        if not (NPM_STAMP.exists() and NPM_STAMP.read_text() == lock):
            # The lock file pins every package; --no-save leaves it as it is.
            _run([npm, "install", "--no-save", "--no-audit", "--no-fund", "--loglevel=error"])
            NPM_STAMP.write_text(lock)
        _run([npm, "run", "build:lib"])
        try:
            from jupyter_builder.federated_extensions import build_labextension as build_ext
        except ImportError:
            raise SystemExit("nbcheckpoint: building the JupyterLab extension needs the Python "
                             "package jupyter_builder (pyproject.toml's build-system.requires "
                             "has it; with --no-build-isolation, pip install jupyter_builder)")
        shutil.rmtree(OUTPUT, ignore_errors=True)    # no stale chunks from an older build
        print(f"nbcheckpoint: building the JupyterLab extension into {OUTPUT}", flush=True)
        build_ext(str(LABEXT))
        STAMP.write_text(digest)

    def _add_data_files(self):
        name = json.loads((OUTPUT / "package.json").read_text())["name"]
        target = Path("share/jupyter/labextensions") / name
        entries = {}
        for f in sorted(OUTPUT.rglob("*")):
            if f.is_file() and f != STAMP:
                rel = f.relative_to(OUTPUT)
                entries.setdefault(str(target / rel.parent), []).append(
                    str(f.relative_to(HERE)))
        entries.setdefault(str(target), []).append(str((LABEXT / "install.json").relative_to(HERE)))
        dist = self.distribution
        dist.data_files = [d for d in (dist.data_files or [])
                           if not str(d[0]).startswith(str(target))]
        dist.data_files.extend((k.replace(os.sep, "/"), v) for k, v in sorted(entries.items()))


class NbcheckpointDistribution(Distribution):
    def has_data(self):
        # setuptools' editable_wheel installs data files only if the distribution has
        # `has_data` (it has only `has_data_files`), so `pip install -e .` would leave out
        # the kernelspec, the server extension's config and the labextension.
        return self.has_data_files()


# First of build's steps, so that install_data (wheel and editable) sees the files.
build.sub_commands.insert(0, ("build_labextension", None))

setup(cmdclass={"build_labextension": build_labextension}, distclass=NbcheckpointDistribution)
