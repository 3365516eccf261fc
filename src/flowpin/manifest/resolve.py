"""Where a pinned artifact lives on this machine.

Repository artifacts are named by repository-relative paths. File sets that live outside the
repository (the Python standard library the ingest stage snapshots) carry a ``uri`` whose scheme says
how to find their base directory here; the manifest never holds an absolute path.
"""

from __future__ import annotations

import platform
import sysconfig
from pathlib import Path
from typing import Any

from flowpin.errors import ArtifactMissingError

PYTHON_STDLIB_URI = "python-stdlib:"


def python_stdlib_uri() -> str:
    """URI of this interpreter's standard library, version included (``python-stdlib:3.11.7``)."""
    return PYTHON_STDLIB_URI + platform.python_version()


def python_stdlib_root() -> Path:
    """The running interpreter's standard library directory (``sysconfig`` ``stdlib`` path), resolved."""
    return Path(sysconfig.get_paths()["stdlib"]).resolve()


def fileset_base(entry: dict[str, Any], root: Path) -> Path:
    """The directory a ``fileset`` dependency's relative paths are relative to."""
    uri = entry.get("uri")
    if not uri:
        return root / str(entry["name"])
    if isinstance(uri, str) and uri.startswith(PYTHON_STDLIB_URI):
        wanted = uri[len(PYTHON_STDLIB_URI) :]
        if wanted != platform.python_version():
            raise ArtifactMissingError(
                f"{entry['name']}: pinned from the Python {wanted} standard library, but this interpreter is "
                f"{platform.python_version()}; verify with Python {wanted}"
            )
        return python_stdlib_root()
    raise ArtifactMissingError(f"{entry['name']}: no resolver for uri {uri!r}; this flowpin cannot locate it")
