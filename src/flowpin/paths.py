"""Artifact names and the repository they live in.

An artifact name is a repository-relative POSIX path (``data/ingest/shard-00000.jsonl.zst``). It is
what gets hashed and signed, so it must not depend on where the checkout lives: absolute paths,
``..`` components, backslashes and empty names are refused, and so is any path that (through
symlinks) resolves outside the repository. :func:`check_output_path` applies the same rules to a path a
recipe key (``paths.out``, ``hydra.run.dir``, ``flowpin fork --out``...) tells flowpin to write, naming the key,
before anything is written.
"""

from __future__ import annotations

import os
from pathlib import Path, PurePosixPath

from flowpin.errors import PathError
from flowpin.settings import Settings

_ROOT_MARKERS = (".dvc", ".git")


def find_root(start: Path | None = None) -> Path:
    """The flowpin project root: the nearest ancestor holding ``.dvc`` or ``.git``.

    ``FLOWPIN_ROOT`` overrides the search.
    """
    env = Settings.from_env().root
    if env:
        return Path(env).resolve()
    here = (start or Path.cwd()).resolve()
    for candidate in (here, *here.parents):
        if any((candidate / marker).exists() for marker in _ROOT_MARKERS):
            return candidate
    raise PathError(
        f"no flowpin project found at or above {here} (looked for .dvc/ or .git/); "
        "run inside the project or set FLOWPIN_ROOT"
    )


def check_name(name: str) -> str:
    """Validate an artifact name and return it in normal form (no ``./``, no trailing ``/``)."""
    if not isinstance(name, str) or not name.strip():
        raise PathError(f"artifact name {name!r} is empty; use a repository-relative path such as data/x")
    if "\\" in name or "\x00" in name:
        raise PathError(f"artifact name {name!r} contains a backslash or NUL; use '/' separated POSIX paths")
    try:
        name.encode("utf-8")
    except UnicodeEncodeError as exc:  # a lone surrogate: no file has this name, and it cannot be hashed as UTF-8
        raise PathError(f"artifact name {name!r} is not valid Unicode ({exc.reason}); name the file in UTF-8") from exc
    pure = PurePosixPath(name)
    if pure.is_absolute():
        raise PathError(f"artifact name {name!r} is absolute; name it relative to the repository root")
    if any(part == ".." for part in pure.parts):
        raise PathError(f"artifact name {name!r} contains '..'; artifacts must stay inside the repository")
    normal = pure.as_posix()
    if normal in ("", "."):
        raise PathError(f"artifact name {name!r} names the repository root itself; name a file or directory in it")
    return normal


PROTECTED = (".git", ".dvc", "keys", ".flowpin/keys")
"""Repository places no stage output (nor anything Hydra writes) may land in: git's and DVC's own state, the
trusted public keys and the signing key."""


def check_output_path(value: object, root: Path, *, what: str) -> str:
    """Validate a path a stage is told to write (or read) and return it as an artifact name.

    ``value`` is a recipe value such as ``paths.out``, named in every message by ``what``. Refused, with a
    :class:`PathError` naming ``what``, the value and the fix, *before* anything is written: an empty or
    non-string value, a backslash or NUL, an absolute path, a ``..`` component, the repository root itself,
    a path inside (or holding) one of :data:`PROTECTED` (``.git/``, ``.dvc/``, ``keys/``, ``.flowpin/keys/``),
    and a path whose existing parents are symlinks resolving outside the repository (or into a protected place).
    """
    fix = f"set {what} to a path inside the repository, relative to its root (e.g. data/<name>)"
    if not isinstance(value, str) or not value.strip():
        raise PathError(f"{what}={value!r} is empty or not a path; {fix}")
    if "\\" in value or "\x00" in value:
        raise PathError(f"{what}={value!r} contains a backslash or NUL; {fix}, '/' separated")
    pure = PurePosixPath(value)
    if pure.is_absolute():
        raise PathError(f"{what}={value!r} is absolute; {fix}")
    if ".." in pure.parts:
        raise PathError(f"{what}={value!r} contains '..' and could leave the repository; {fix}")
    name = pure.as_posix()
    if name == ".":
        raise PathError(f"{what}={value!r} names the repository root itself; {fix}, naming a file or directory in it")
    _refuse_protected(name, value, what, fix)
    real_root = root.resolve()
    try:
        real = (root / name).resolve()
    except (OSError, RuntimeError) as exc:  # a symlink loop
        raise PathError(f"{what}={value!r}: cannot resolve ({exc}); remove the symlink loop or {fix}") from exc
    if real == real_root:
        raise PathError(f"{what}={value!r} resolves (through a symlink) to the repository root itself; {fix}")
    if real_root not in real.parents:
        raise PathError(
            f"{what}={value!r} resolves through a symlink to {real}, outside the repository {real_root}; "
            f"replace the symlink with a real directory or {fix}"
        )
    _refuse_protected(real.relative_to(real_root).as_posix(), value, what, fix)
    return name


def _refuse_protected(name: str, value: object, what: str, fix: str) -> None:
    for place in PROTECTED:
        if name == place or name.startswith(place + "/"):
            raise PathError(f"{what}={value!r} lies in {place}/, which is no stage's to read or write; {fix}")
        if place.startswith(name + "/"):  # a directory output replaces its whole tree
            raise PathError(f"{what}={value!r} holds {place}/, which no stage may replace; {fix}")


def to_name(path: str | os.PathLike[str], root: Path) -> str:
    """Turn a filesystem path (absolute or relative to ``root``) into a checked artifact name."""
    p = Path(path)
    if p.is_absolute():
        try:
            p = p.relative_to(root)
        except ValueError:
            try:
                p = p.resolve().relative_to(root.resolve())
            except ValueError as exc:
                raise PathError(f"{path} is outside the repository {root}; artifacts must live inside it") from exc
    return check_name(p.as_posix())


def resolve_inside(name: str, root: Path) -> Path:
    """Map an artifact name to its path under ``root``, refusing symlinks that escape ``root``."""
    normal = check_name(name)
    path = root / normal
    real_root = root.resolve()
    try:
        real = path.resolve()
    except (OSError, RuntimeError) as exc:  # symlink loop
        raise PathError(f"{normal}: cannot resolve ({exc}); remove the symlink loop") from exc
    if real != real_root and real_root not in real.parents:
        raise PathError(
            f"{normal} resolves to {real}, outside the repository {real_root}; "
            "replace the symlink with the file itself or move the target into the repository"
        )
    return path
