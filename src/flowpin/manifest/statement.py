"""The manifest format: reading, validating and writing signed statements.

A manifest file is a DSSE envelope (JSON) whose payload is the canonical JSON of an in-toto Statement
v1 with a SLSA provenance v1 predicate (schema: ``schema/statement-v1.schema.json``). Every read and
every write validates the envelope and the statement against the shipped JSON Schemas; the manifest
version is checked first so that a newer format gets a clear "unsupported version" error instead of a
schema error.

*Identity* is ``subject`` plus ``predicate.buildDefinition``: what was produced, from what, how and in
which environment. ``runDetails`` (builder, times, invocation id, host, durations, byproducts) is run
metadata and is ignored by diff/rebuild unless asked.

*Reading* a statement's fields goes through this module only: :class:`Manifest`'s accessors (stage,
recipe, overrides, paths, entry point, environment, git, dependencies by kind, pinned code/config files,
byproducts and notes) and, for one subject or dependency, :func:`entry_kind`, :func:`entry_type`,
:func:`entry_files`, :func:`entry_size`. Consumers do not index ``externalParameters`` & co. themselves, so a
field moves in one place. :class:`EntryPoint` is how a manifest says to re-run itself.
"""

from __future__ import annotations

import dataclasses
import functools
import json
from collections.abc import Collection, Sequence
from importlib import resources
from pathlib import Path
from typing import Any

import jsonschema

from flowpin.atomic import atomic_write_bytes
from flowpin.canonical import canonical_json
from flowpin.errors import (
    DuplicateSubjectError,
    EntryPointError,
    JSONDuplicateKeyError,
    JSONEncodingError,
    JSONSyntaxError,
    ManifestParseError,
    MissingEntryPointError,
    PathError,
    SchemaError,
    StrictJSONError,
    UnsupportedVersionError,
)
from flowpin.hashing import hash_bytes
from flowpin.jsonio import loads_strict
from flowpin.paths import check_name, resolve_inside
from flowpin.safeio import read_regular
from flowpin.signing import PAYLOAD_TYPE, Signer, decode_b64

STATEMENT_TYPE = "https://in-toto.io/Statement/v1"
PREDICATE_TYPE = "https://slsa.dev/provenance/v1"
BUILD_TYPE = "https://flowpin.dev/buildtypes/stage/v1"
BUILDER_ID = "https://flowpin.dev/builder/local/v1"
MANIFEST_VERSION = 1
MAX_MANIFEST_BYTES = 256 << 20


@functools.cache
def _validator(name: str) -> jsonschema.protocols.Validator:
    text = resources.files("flowpin.manifest").joinpath("schema", name).read_text("utf-8")
    schema = json.loads(text)
    cls = jsonschema.validators.validator_for(schema)
    cls.check_schema(schema)
    return cls(schema, format_checker=cls.FORMAT_CHECKER)


def _validate(name: str, instance: Any, where: str) -> None:
    errors = sorted(_validator(name).iter_errors(instance), key=lambda e: list(e.absolute_path))
    if errors:
        first = errors[0]
        loc = "/".join(str(p) for p in first.absolute_path) or "(root)"
        more = f" (and {len(errors) - 1} more)" if len(errors) > 1 else ""
        raise SchemaError(
            f"{where}: at {loc}: {first.message}{more}; the manifest does not follow {name} -- restore it from git "
            "or re-run its stage"
        )


def validate_statement(statement: Any, where: str) -> None:
    """Version check, canonical and unique artifact names, JSON Schema validation.

    Every subject and dependency name, and every key of a ``flowpin.files`` map, must be a canonical
    artifact name (:func:`flowpin.paths.check_name` returns it unchanged: no ``./`` or empty segment, no
    trailing ``/``), and no two of them may name the same artifact once normalised: ``data/synth`` and
    ``./data/synth`` are one artifact, and a statement listing both could pin it twice with different
    digests. Names are checked before the schema, which says the same, so the message names the fix.
    """
    version = _dig(statement, "predicate", "buildDefinition", "internalParameters", "manifestVersion")
    if isinstance(version, int) and not isinstance(version, bool) and version != MANIFEST_VERSION:
        raise UnsupportedVersionError(
            f"{where}: manifestVersion {version} is not supported by this flowpin (understands "
            f"{MANIFEST_VERSION}); upgrade flowpin or re-record the stage"
        )
    for field, items in (
        ("subject", _dig(statement, "subject")),
        ("resolvedDependencies", _dig(statement, "predicate", "buildDefinition", "resolvedDependencies")),
    ):
        if isinstance(items, list):
            _check_names(field, [_dig(item, "name") for item in items], where)
            for i, item in enumerate(items):
                files = _dig(item, "annotations", "flowpin.files")
                if isinstance(files, dict):
                    _check_names(f"{field}[{i}].annotations.flowpin.files", list(files), where)
    _validate("statement-v1.schema.json", statement, where)


def _check_names(field: str, names: list[Any], where: str) -> None:
    """The string ``names`` of ``field`` are canonical and distinct after normalisation (others: the schema's)."""
    first: dict[str, str] = {}
    for name in names:
        if not isinstance(name, str):
            continue  # the schema reports it
        try:
            normal = check_name(name)
        except PathError:
            continue  # unsafe ('..', absolute, not Unicode): refused by the schema or, by name, when resolved
        if normal in first:
            spelled = f"{first[normal]!r} and {name!r}" if first[normal] != name else f"{name!r} twice"
            raise DuplicateSubjectError(
                f"{where}: {field} names the artifact {normal!r} more than once ({spelled}); each artifact must "
                "appear once -- re-run the stage to record a valid manifest"
            )
        first[normal] = name
    for name in first.values():
        if check_name(name) != name:
            raise SchemaError(
                f"{where}: {field} names {name!r}, which is not a canonical artifact name (flowpin writes "
                f"{check_name(name)!r}: no './' or empty segment, no trailing '/'); restore it from git or re-run "
                "its stage"
            )


def _dig(value: Any, *keys: str) -> Any:
    for key in keys:
        if not isinstance(value, dict):
            return None
        value = value.get(key)
    return value


# --- reading a statement's fields (the one place that knows where each lives) -------------------------


def entry_kind(entry: dict[str, Any]) -> str | None:
    """A dependency's ``kind`` annotation (dataset, checkpoint, config, code, manifest, ...); None for a subject."""
    kind = entry["annotations"].get("kind")
    return None if kind is None else str(kind)


def entry_type(entry: dict[str, Any]) -> str:
    """A subject's or dependency's ``flowpin.type``: file, directory, fileset or manifest."""
    return str(entry["annotations"]["flowpin.type"])


def entry_files(entry: dict[str, Any]) -> dict[str, str]:
    """Relative path → hex digest of every file of a directory or file set (``flowpin.files``; {} for a file)."""
    return entry["annotations"].get("flowpin.files", {})  # type: ignore[no-any-return]


def entry_size(entry: dict[str, Any]) -> int | None:
    """Bytes of a subject or dependency (``flowpin.size``; None for a parent manifest)."""
    size = entry["annotations"].get("flowpin.size")
    return size if isinstance(size, int) else None


@dataclasses.dataclass(frozen=True, kw_only=True)
class EntryPoint:
    """How to re-run the stage a manifest records (``externalParameters.entryPoint``)::

        python <script> --config-name <config_name> <overrides...>      # from the repository root

    Recorded by the stage itself (:func:`flowpin.stage.stage_run`), so rebuild and fork never guess it from
    the pinned files. Both must be among the files the manifest pins (:meth:`Manifest.require_entry_point`).
    """

    script: str
    """The stage script, a repository-relative POSIX path (``stages/train.py``)."""
    config_name: str
    """The primary Hydra config, as Hydra's ``--config-name`` takes it (``pretrain``)."""
    config_dir: str = "params"
    """The Hydra config directory, repository-relative (the primary config is ``<config_dir>/<config_name>.yaml``)."""

    @property
    def config_file(self) -> str:
        """The primary config's artifact name (``params/pretrain.yaml``)."""
        name = self.config_name if self.config_name.endswith((".yaml", ".yml")) else f"{self.config_name}.yaml"
        return f"{self.config_dir}/{name}"

    def command(self, overrides: Sequence[str], python: str = "python") -> list[str]:
        """The command line that re-runs the stage with ``overrides``."""
        return [python, self.script, "--config-name", self.config_name, *overrides]

    def as_json(self) -> dict[str, str]:
        return {"script": self.script, "configName": self.config_name, "configDir": self.config_dir}

    @classmethod
    def from_json(cls, value: dict[str, Any]) -> EntryPoint:
        return cls(
            script=str(value["script"]), config_name=str(value["configName"]), config_dir=str(value["configDir"])
        )


@dataclasses.dataclass(frozen=True)
class Manifest:
    """A parsed, schema-valid manifest (signature NOT yet checked: see ``verify``)."""

    path: Path
    envelope: dict[str, Any]
    statement: dict[str, Any]

    # --- identity: externalParameters ---------------------------------------------------------------

    @property
    def stage(self) -> str:
        return str(self._external["stage"])

    @property
    def recipe(self) -> dict[str, Any]:
        """The resolved recipe the stage ran (``externalParameters.recipe``)."""
        return self._external["recipe"]  # type: ignore[no-any-return]

    @property
    def overrides(self) -> list[str]:
        """The Hydra overrides the run was composed with (``externalParameters.overrides``)."""
        return [str(o) for o in self._external["overrides"]]

    @property
    def paths(self) -> dict[str, Any]:
        """The recipe's ``paths`` block (out, report, manifest, inputs); {} when the recipe has none."""
        paths = self.recipe.get("paths")
        return paths if isinstance(paths, dict) else {}

    @property
    def entry_point(self) -> EntryPoint | None:
        """How the run was started (``externalParameters.entryPoint``); None in a manifest recorded before
        entry points were pinned, or by a caller of :func:`~flowpin.manifest.record.record` that named none."""
        value = self._external.get("entryPoint")
        return None if value is None else EntryPoint.from_json(value)

    def require_entry_point(self, *, root: Path, purpose: str) -> EntryPoint:
        """The entry point, checked against the pins: its script a code file and its primary config a config
        file the manifest pins, both inside ``root`` (no symlink out). ``purpose`` completes "cannot …".

        :class:`~flowpin.errors.MissingEntryPointError` for a manifest without one,
        :class:`~flowpin.errors.EntryPointError` for one that names something the manifest does not pin.
        """
        entry = self.entry_point
        if entry is None:
            raise MissingEntryPointError(
                f"{self.path}: recorded before manifests pinned their entry point (externalParameters.entryPoint: "
                f"which script and Hydra config ran); cannot {purpose} without guessing them -- re-run stage "
                f"{self.stage} (dvc repro {self.stage}, or its stages/*.py script) to record it again"
            )
        for field, value, pinned, kind in (
            ("script", entry.script, self.code_files, "code"),
            ("configDir/configName", entry.config_file, self.config_files, "config"),
        ):
            try:
                resolve_inside(value, root)
            except PathError as exc:
                raise EntryPointError(
                    f"{self.path}: entryPoint.{field} {value!r}: {exc}; cannot {purpose} -- re-run stage "
                    f"{self.stage} to record a valid manifest"
                ) from exc
            if value not in pinned:
                raise EntryPointError(
                    f"{self.path}: entryPoint.{field} names {value!r}, which is not a {kind} file the manifest pins: "
                    f"what would run is not what was pinned; cannot {purpose} -- re-run stage {self.stage} to "
                    "record a consistent manifest"
                )
        return entry

    @property
    def _external(self) -> dict[str, Any]:
        return self.build["externalParameters"]  # type: ignore[no-any-return]

    # --- identity: internalParameters and resolvedDependencies --------------------------------------

    @property
    def build(self) -> dict[str, Any]:
        return self.statement["predicate"]["buildDefinition"]  # type: ignore[no-any-return]

    @property
    def run_details(self) -> dict[str, Any]:
        return self.statement["predicate"]["runDetails"]  # type: ignore[no-any-return]

    @property
    def subjects(self) -> list[dict[str, Any]]:
        return self.statement["subject"]  # type: ignore[no-any-return]

    @property
    def dependencies(self) -> list[dict[str, Any]]:
        return self.build["resolvedDependencies"]  # type: ignore[no-any-return]

    @property
    def algorithm(self) -> str:
        return str(self._internal["digestAlgorithm"])

    @property
    def manifest_version(self) -> int:
        return int(self._internal["manifestVersion"])

    @property
    def environment(self) -> dict[str, Any]:
        """The environment fingerprint (``internalParameters.environment``: python, torch, cpu, git, envVars...)."""
        return self._internal["environment"]  # type: ignore[no-any-return]

    @property
    def git(self) -> dict[str, Any]:
        """The git state of the checkout that ran (commit, dirty, dirtyDigest); {} when none was recorded."""
        return self.environment.get("git") or {}

    @property
    def _internal(self) -> dict[str, Any]:
        return self.build["internalParameters"]  # type: ignore[no-any-return]

    def dependencies_of(self, *kinds: str) -> list[dict[str, Any]]:
        """The dependencies whose ``kind`` is one of ``kinds``, in recorded order."""
        return [d for d in self.dependencies if entry_kind(d) in kinds]

    def restricted_to(self, names: Collection[str]) -> Manifest:
        """This manifest with only the subjects and dependencies named ``names`` (what a consumer relies on:
        :func:`~flowpin.manifest.trust.require_digests` re-hashes just those). Not a statement to sign."""
        wanted = set(names)
        build = {**self.build, "resolvedDependencies": [d for d in self.dependencies if d["name"] in wanted]}
        statement = {
            **self.statement,
            "subject": [s for s in self.subjects if s["name"] in wanted],
            "predicate": {**self.statement["predicate"], "buildDefinition": build},
        }
        return dataclasses.replace(self, statement=statement)

    def dependency_names(self, *kinds: str) -> list[str]:
        """The names of :meth:`dependencies_of` ``kinds``."""
        return [str(d["name"]) for d in self.dependencies_of(*kinds)]

    @property
    def parents(self) -> list[dict[str, Any]]:
        """The parent-manifest dependencies (kind ``manifest``)."""
        return self.dependencies_of("manifest")

    def pinned_files(self, *kinds: str) -> list[str]:
        """Repository name of every file the dependencies of ``kinds`` pin: a file dependency itself, each file
        of a directory or file set in the repository (``<name>/<relative path>``); file sets outside it
        (``uri``: the stdlib, installed packages) are not repository files."""
        out: list[str] = []
        for dep in self.dependencies_of(*kinds):
            if "uri" in dep:
                continue
            if entry_type(dep) == "file":
                out.append(str(dep["name"]))
            else:
                out.extend(f"{dep['name']}/{rel}" for rel in sorted(entry_files(dep)))
        return out

    @property
    def code_files(self) -> list[str]:
        """Every code file the manifest pins (:meth:`pinned_files` of kind ``code``)."""
        return self.pinned_files("code")

    @property
    def config_files(self) -> list[str]:
        """Every recipe file the manifest pins (:meth:`pinned_files` of kind ``config``)."""
        return self.pinned_files("config")

    # --- run metadata: runDetails ------------------------------------------------------------------

    @property
    def metadata(self) -> dict[str, Any]:
        """``runDetails.metadata``: invocationId, startedOn, finishedOn."""
        return self.run_details["metadata"]  # type: ignore[no-any-return]

    @property
    def byproducts(self) -> list[dict[str, Any]]:
        """``runDetails.byproducts``: pinned reports and the inline notes (run-context, tracking, sweep-job, fork)."""
        return self.run_details.get("byproducts", [])  # type: ignore[no-any-return]

    def byproduct(self, name: str) -> dict[str, Any] | None:
        """The byproduct descriptor named ``name`` (a report's artifact name, or a note's name), if any."""
        return next((b for b in self.byproducts if b.get("name") == name), None)

    def note(self, name: str) -> dict[str, Any] | None:
        """The annotations of the run-metadata note ``name`` (``rec.note(name, ...)``), if recorded."""
        found = self.byproduct(name)
        annotations = None if found is None else found.get("annotations")
        return annotations if isinstance(annotations, dict) else None

    def identity(self) -> dict[str, Any]:
        return identity_of(self.statement)

    def identity_digest(self, algorithm: str = "sha256") -> str:
        """Digest of the canonical identity (subjects + build definition)."""
        return hash_bytes(canonical_json(self.identity()), algorithm)

    def outputs_digest(self, algorithm: str = "sha256") -> str:
        """Digest of the canonical subject list: what child stages pin (see ``StageRecorder.parent``)."""
        return hash_bytes(canonical_json(self.subjects), algorithm)


def identity_of(statement: dict[str, Any]) -> dict[str, Any]:
    """The part of a statement that defines the artifacts (no times, hosts or durations)."""
    return {"subject": statement["subject"], "buildDefinition": statement["predicate"]["buildDefinition"]}


def parse_manifest_bytes(data: bytes, where: str) -> tuple[dict[str, Any], dict[str, Any]]:
    """Parse and validate an envelope and its statement; returns (envelope, statement)."""
    try:
        envelope = loads_strict(data, where=where, max_bytes=MAX_MANIFEST_BYTES)
    except JSONDuplicateKeyError as exc:
        raise ManifestParseError(
            f"{where}: the envelope repeats the key {exc.key!r} (JSON parsers disagree on which one counts); "
            "restore the manifest from git or re-run its stage"
        ) from exc
    except JSONEncodingError as exc:
        raise ManifestParseError(
            f"{where}: {exc.reason}; is this a manifest? If so, restore it from git or re-run its stage"
        ) from exc
    except JSONSyntaxError as exc:
        raise ManifestParseError(f"{where}: {exc.reason}; restore the manifest from git or re-run its stage") from exc
    except StrictJSONError as exc:  # NaN/Infinity, nested too deep, too large
        raise ManifestParseError(
            f"{where}: JSON that no manifest contains ({exc.reason}); restore the manifest from git or re-run its stage"
        ) from exc
    _validate("envelope.schema.json", envelope, where)
    body = decode_b64(envelope["payload"], f"{where}: payload")
    try:
        statement = loads_strict(body, where=f"{where}: payload", max_bytes=MAX_MANIFEST_BYTES)
    except JSONDuplicateKeyError as exc:
        raise ManifestParseError(
            f"{where}: the payload repeats the key {exc.key!r} (JSON parsers disagree on which one counts); "
            "flowpin never writes such a statement -- re-run its stage"
        ) from exc
    except StrictJSONError as exc:  # not UTF-8, not JSON, NaN, 4300+ digit number, too deep
        raise ManifestParseError(
            f"{where}: payload is not JSON ({exc.reason}); the envelope is corrupt -- restore it from git or re-run "
            "its stage"
        ) from exc
    validate_statement(statement, where)
    return envelope, statement


_MANIFEST_FIX = "name a manifest file, or restore the manifest from git or re-run its stage"


def load_manifest(path: Path) -> Manifest:
    """Read (a regular file only: :func:`flowpin.safeio.read_regular`), parse and schema-validate one manifest."""
    try:
        size = path.stat().st_size
        if size > MAX_MANIFEST_BYTES:
            raise ManifestParseError(
                f"{path}: {size} bytes is larger than any manifest flowpin writes ({MAX_MANIFEST_BYTES}); refusing -- "
                "restore the manifest from git or re-run its stage"
            )
        data = read_regular(path, max_bytes=MAX_MANIFEST_BYTES, what="manifest", fix=_MANIFEST_FIX)
    except FileNotFoundError as exc:
        raise ManifestParseError(f"{path}: no such manifest; run its stage (dvc repro) or check the path") from exc
    except OSError as exc:
        raise ManifestParseError(f"{path}: cannot read ({exc.strerror}); check permissions") from exc
    envelope, statement = parse_manifest_bytes(data, str(path))
    return Manifest(path=path, envelope=envelope, statement=statement)


def write_manifest(path: Path, statement: dict[str, Any], signer: Signer) -> bytes:
    """Validate, sign and atomically write ``statement``; returns the bytes written."""
    validate_statement(statement, str(path))
    envelope = signer.sign(PAYLOAD_TYPE, canonical_json(statement))
    data = json.dumps(envelope, indent=2, sort_keys=True).encode("utf-8") + b"\n"
    parse_manifest_bytes(data, str(path))  # what we publish must read back
    atomic_write_bytes(path, data)
    return data
