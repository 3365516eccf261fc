"""The manifest format: reading, validating and writing signed statements.

A manifest file is a DSSE envelope (JSON) whose payload is the canonical JSON of an in-toto Statement
v1 with a SLSA provenance v1 predicate (schema: ``schema/statement-v1.schema.json``). Every read and
every write validates the envelope and the statement against the shipped JSON Schemas; the manifest
version is checked first so that a newer format gets a clear "unsupported version" error instead of a
schema error.

*Identity* is ``subject`` plus ``predicate.buildDefinition``: what was produced, from what, how and in
which environment. ``runDetails`` (builder, times, invocation id, host, durations, byproducts) is run
metadata and is ignored by diff/rebuild unless asked.
"""

from __future__ import annotations

import dataclasses
import functools
import json
from importlib import resources
from pathlib import Path
from typing import Any

import jsonschema

from flowpin.atomic import atomic_write_bytes
from flowpin.canonical import canonical_json
from flowpin.errors import (
    DuplicateSubjectError,
    JSONDuplicateKeyError,
    JSONEncodingError,
    JSONSyntaxError,
    ManifestParseError,
    PathError,
    SchemaError,
    StrictJSONError,
    UnsupportedVersionError,
)
from flowpin.hashing import hash_bytes
from flowpin.jsonio import loads_strict
from flowpin.paths import check_name
from flowpin.safeio import read_regular
from flowpin.signing import PAYLOAD_TYPE, Signer, decode_b64

STATEMENT_TYPE = "https://in-toto.io/Statement/v1"
PREDICATE_TYPE = "https://slsa.dev/provenance/v1"
BUILD_TYPE = "https://flowpin.dev/buildtypes/stage/v1"
BUILDER_ID = "https://flowpin.dev/builder/local/v1"
MANIFEST_VERSION = 1
MANIFEST_DIR = "manifests"
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


@dataclasses.dataclass(frozen=True)
class Manifest:
    """A parsed, schema-valid manifest (signature NOT yet checked: see ``verify``)."""

    path: Path
    envelope: dict[str, Any]
    statement: dict[str, Any]

    @property
    def stage(self) -> str:
        return str(self.statement["predicate"]["buildDefinition"]["externalParameters"]["stage"])

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
        return str(self.build["internalParameters"]["digestAlgorithm"])

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
