"""Property-based fuzzing of everything flowpin parses from untrusted bytes.

Canonical JSON, manifest files (``flowpin verify``'s loader and verifier), DSSE envelopes, checkpoint
``state.json`` and zstd shards are fed arbitrary and mutated inputs. The property is always the same:
the code under test returns a result or raises a :class:`FlowpinError` -- any other exception is a
*crash* -- plus, where there is one, a soundness property (a mutated payload never verifies; canonical
output round-trips and agrees with RFC 8785).

Every call into flowpin goes through :meth:`Tally.guard`, which counts the cases actually executed (shrinking
included) and the crashes. The tally belongs to the module-scoped ``fuzz_tally`` fixture: when the module's
last test is done, whatever the order or selection, it prints ``fuzz: N cases, M crashes`` and, under the
``fuzz`` profile (``make fuzz``) when every property of the module ran in this process, checks that at least
10,000 cases ran. The profiles are registered in ``tests/conftest.py``: ``ci`` (the default: derandomized, few
examples) and ``fuzz``.
"""

from __future__ import annotations

import base64
import collections
import copy
import dataclasses
import hashlib
import json
import os
import sys
import tempfile
import traceback
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, TypeVar

import pytest
import zstandard
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey
from hypothesis import given, is_hypothesis_test, settings
from hypothesis import strategies as st

from flowpin.canonical import MAX_DEPTH, canonical_json
from flowpin.errors import (
    ArtifactMissingError,
    ArtifactUnreadableError,
    BadSignatureError,
    CanonicalError,
    FlowpinError,
    ManifestParseError,
    PathError,
    ShardError,
)
from flowpin.hashing import Hasher
from flowpin.manifest.digests import identity_key
from flowpin.manifest.record import record
from flowpin.manifest.resolve import python_package_root, python_package_uri
from flowpin.manifest.statement import parse_manifest_bytes
from flowpin.manifest.verify import verify_manifest
from flowpin.signing import PAYLOAD_TYPE, Signer, decode_b64, init_key, keyid_of, load_trust_store, pae, verify_envelope
from helpers import REPO, Project

T = TypeVar("T")

FUZZ_MIN_CASES = 10_000
"""What one ``make fuzz`` run must execute at least (the nightly target's promise)."""

# --- counting cases and crashes -------------------------------------------------------------------

UNCOUNTED = ("setup", "regression")
"""Labels of cases that are no fuzz property's (the seed manifest's check, the regression tests)."""


def _current_test() -> str:
    """The running test function's name, from pytest's ``PYTEST_CURRENT_TEST`` (``path::name[params] (call)``)."""
    current = os.environ.get("PYTEST_CURRENT_TEST", "")
    return current.rpartition("::")[2].partition(" ")[0].partition("[")[0]


@dataclasses.dataclass
class Tally:
    """The cases and crashes of one run of this module's properties (see the module docstring)."""

    cases: collections.Counter[str] = dataclasses.field(default_factory=collections.Counter)
    """Cases executed, by label."""
    crashes: set[str] = dataclasses.field(default_factory=set)
    ran: set[str] = dataclasses.field(default_factory=set)
    """The test functions that executed a case."""

    def guard(self, label: str, call: Callable[[], T]) -> T | FlowpinError:
        """Run one case: its result, or the FlowpinError it raised; any other exception is a crash (re-raised)."""
        self.cases[label] += 1
        self.ran.add(_current_test())
        try:
            return call()
        except FlowpinError as exc:
            return exc
        except Exception as exc:
            frame = traceback.extract_tb(exc.__traceback__)[-1]
            self.crashes.add(f"{label}: {type(exc).__name__} at {Path(frame.filename).name}:{frame.lineno}")
            raise

    def total(self) -> int:
        return sum(n for label, n in self.cases.items() if label not in UNCOUNTED)

    def summary(self, profile: str) -> str:
        per_label = ", ".join(f"{label} {n}" for label, n in sorted(self.cases.items()) if label not in UNCOUNTED)
        lines = [
            f"fuzz: {self.total()} cases, {len(self.crashes)} crashes (hypothesis profile {profile!r}; {per_label})"
        ]
        return "\n".join([*lines, *(f"fuzz crash: {crash}" for crash in sorted(self.crashes))])


def _properties(module: object) -> set[str]:
    """The hypothesis tests of ``module``."""
    return {name for name, f in vars(module).items() if name.startswith("test_") and is_hypothesis_test(f)}


@pytest.fixture(scope="module", autouse=True)
def fuzz_tally(request: pytest.FixtureRequest) -> Iterator[Tally]:
    """This module's tally; after its last test, the summary line and the checks (see the module docstring)."""
    tally = Tally()
    yield tally
    if not tally.total():
        return  # no property ran here (the regressions alone were selected)
    profile = settings.get_current_profile_name()
    capture = request.config.pluginmanager.getplugin("capturemanager")
    with capture.global_and_fixture_disabled():
        print(f"\n{tally.summary(profile)}")
    assert not tally.crashes, sorted(tally.crashes)
    if profile == "fuzz" and _properties(request.module) <= tally.ran:
        assert tally.total() >= FUZZ_MIN_CASES, (
            f"only {tally.total()} cases ran; the fuzz profile promises {FUZZ_MIN_CASES}"
        )


def test_the_tally_counts_cases_names_crashes_and_knows_the_running_test() -> None:
    tally = Tally()
    assert tally.guard("p", lambda: 1) == 1
    refused = tally.guard("p", lambda: canonical_json(float("nan")))
    assert isinstance(refused, CanonicalError)
    with pytest.raises(ZeroDivisionError):
        tally.guard("p", lambda: 1 // 0)
    assert tally.cases == {"p": 3} and tally.total() == 3
    (crash,) = tally.crashes
    assert crash.startswith("p: ZeroDivisionError at test_fuzz.py:")
    assert tally.ran == {"test_the_tally_counts_cases_names_crashes_and_knows_the_running_test"}
    tally.guard("setup", lambda: None)
    assert tally.total() == 3 and "setup" not in tally.summary("ci")
    assert "test_canonical_json_agrees_with_rfc8785" in _properties(sys.modules[__name__])


# --- strategies: JSON-like values -----------------------------------------------------------------

_SPECIAL_CHARS = [
    "\x00", "\x1f", "\x7f", "\u2028", "\u2029", "\ufeff", '"', "\\", "/", "é", "€", "\U0001f600", "\U0010ffff",
    "\ud800", "\udbff", "\udc00", "\udfff", "\ud83d", "\ude00", "\ue000",
]  # fmt: skip
_text = st.one_of(
    st.text(max_size=12),
    st.text(st.characters(exclude_categories=()), max_size=8),  # surrogates included
    st.text(st.sampled_from(_SPECIAL_CHARS), max_size=6),
)
_SAFE = 2**53 - 1


class _HugeInt(int):
    """An int past Python's 4300-digit str() limit whose repr hypothesis can still print (flowpin sees an int)."""

    def __repr__(self) -> str:
        return f"<int of {self.bit_length()} bits>"


_ints = st.one_of(
    st.integers(),
    st.integers(_SAFE - 3, _SAFE + 3),
    st.integers(-_SAFE - 3, -_SAFE + 3),
    st.sampled_from([10**17, 2**60, 2**63, 10**21, 10**308, 2**1023, 2**1024, 10**400]),
    st.sampled_from([4301, 5000, -5000]).map(lambda e: _HugeInt((-1 if e < 0 else 1) * 10 ** abs(e))),
)
_floats = st.one_of(
    st.floats(),
    st.sampled_from([0.0, -0.0, float("nan"), float("inf"), -float("inf"), 5e-324, 1.7976931348623157e308]),
    st.sampled_from([1e21, 1e-7, 1e-6, 123456789012345680000.0, 0.1, 1 / 3, 2.0**53, 2.0**60]),
)
_json_scalars = st.one_of(st.none(), st.booleans(), _ints, _floats, _text)
_json_values = st.recursive(
    _json_scalars,
    lambda kids: st.lists(kids, max_size=5) | st.dictionaries(_text, kids, max_size=5),
    max_leaves=25,
)
# Values that are not JSON at all: canonical_json must refuse them by name, not crash.
_junk_scalars = st.one_of(st.binary(max_size=4), st.builds(object), st.complex_numbers(), st.frozensets(st.integers()))
_any_values = st.recursive(
    st.one_of(_json_scalars, _junk_scalars),
    lambda kids: st.one_of(
        st.lists(kids, max_size=4),
        st.lists(kids, max_size=4).map(tuple),
        st.dictionaries(_text, kids, max_size=4),
        st.dictionaries(st.one_of(_text, st.integers(), st.none(), st.booleans()), kids, max_size=3),
    ),
    max_leaves=20,
)


def _as_json(value: Any) -> Any:
    """What ``json.loads`` of a faithful encoding returns (tuples become lists)."""
    if isinstance(value, dict):
        return {k: _as_json(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_as_json(v) for v in value]
    return value


def _as_doubles(out: bytes) -> Any:
    """Parse strict UTF-8 JSON the way RFC 8785 reads numbers: as doubles (exact ints up to 2**53-1).

    ``5.726221347142273e16`` is written ``57262213471422730`` (ECMAScript's shortest digits), which names the
    same double but is not the same Python int.
    """
    return json.loads(out.decode("utf-8"), parse_int=lambda s: int(s) if abs(int(s)) <= _SAFE else float(s))


def _reordered(value: Any) -> Any:
    """The same value with every dict's insertion order reversed."""
    if isinstance(value, dict):
        return {k: _reordered(value[k]) for k in reversed(list(value))}
    if isinstance(value, list):
        return [_reordered(v) for v in value]
    return value


def _has_unsafe_int(value: Any) -> bool:
    if isinstance(value, dict):
        return any(_has_unsafe_int(v) for v in value.values())
    if isinstance(value, list):
        return any(_has_unsafe_int(v) for v in value)
    return isinstance(value, int) and not isinstance(value, bool) and abs(value) > _SAFE


# --- canonical JSON -------------------------------------------------------------------------------


@given(_any_values)
def test_canonical_json_returns_bytes_or_refuses_by_name(fuzz_tally: Tally, value: Any) -> None:
    out = fuzz_tally.guard("canonical", lambda: canonical_json(value))
    if isinstance(out, FlowpinError):
        assert isinstance(out, CanonicalError), repr(out)
        return
    assert canonical_json(copy.deepcopy(value)) == out  # deterministic
    assert canonical_json(_reordered(_as_json(value))) == out  # insertion order does not matter
    assert _as_doubles(out) == _as_json(value)  # nothing coerced: numbers are IEEE doubles in JCS (1.0 == 1)
    assert canonical_json(json.loads(out.decode("utf-8"))) == out  # idempotent


@given(st.dictionaries(_text, _json_values, min_size=2, max_size=8), st.randoms(use_true_random=False))
def test_canonical_json_ignores_key_order(fuzz_tally: Tally, value: dict[str, Any], rnd: Any) -> None:
    items = list(value.items())
    rnd.shuffle(items)
    a = fuzz_tally.guard("canonical_order", lambda: canonical_json(value))
    b = fuzz_tally.guard("canonical_order", lambda: canonical_json(dict(items)))
    assert type(a) is type(b)
    if isinstance(a, bytes):
        assert a == b


@given(_json_values)
def test_canonical_json_agrees_with_rfc8785(fuzz_tally: Tally, value: Any) -> None:
    """The module claims RFC 8785 (JCS); the ``rfc8785`` package is the oracle.

    One documented extension: an integer above 2**53-1 that is exactly the canonical form of a double
    (``1e17`` read back from flowpin's own output) is accepted, where the oracle refuses every such int.
    """
    rfc8785 = pytest.importorskip("rfc8785")
    ours = fuzz_tally.guard("canonical_rfc8785", lambda: canonical_json(value))
    try:
        theirs: bytes | None = rfc8785.dumps(value)
    # CanonicalizationError is a ValueError; the oracle's own crashes on a surrogate key (UnicodeEncodeError)
    # and on an int past 4300 digits (ValueError from its message) are refusals too.
    except (ValueError, UnicodeEncodeError):
        theirs = None
    if theirs is not None:
        assert ours == theirs
    elif not isinstance(ours, FlowpinError):
        assert _has_unsafe_int(value), f"flowpin accepted what RFC 8785 refuses: {ours!r}"
        assert _as_doubles(ours) == value


@given(st.integers(1, 200_000), st.sampled_from(["[", "{"]))
def test_canonical_json_refuses_deep_nesting_by_name(fuzz_tally: Tally, depth: int, kind: str) -> None:
    value: Any = []
    for _ in range(depth):
        value = [value] if kind == "[" else {"k": value}
    out = fuzz_tally.guard("canonical_deep", lambda: canonical_json(value))
    if isinstance(out, bytes):
        assert json.loads(out) == value
        assert depth <= MAX_DEPTH


# --- mutations of JSON documents ------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Raw:
    """JSON text emitted verbatim: what ``json.dumps`` cannot produce (deep nesting, 5000-digit numbers)."""

    text: str


@dataclasses.dataclass(frozen=True)
class Pairs:
    """An object written with these (possibly repeated) keys, in this order."""

    items: tuple[tuple[str, Any], ...]


_raw_extremes = st.one_of(
    st.builds(lambda n: Raw("[" * n + "]" * n), st.sampled_from([50, 900, 1_000, 5_000, 100_000])),
    st.builds(lambda n: Raw('{"a":' * n + "0" + "}" * n), st.sampled_from([50, 900, 5_000, 100_000])),
    st.sampled_from(
        [Raw("9" * 5000), Raw("-" + "1" * 4301), Raw("1e999999"), Raw("-1e-999999"), Raw("NaN"), Raw("-Infinity")]
    ),
    st.sampled_from([Raw("1" * 4300), Raw("0." + "0" * 5000 + "1"), Raw('"\\ud800"'), Raw('"\\udc00\\ud800"')]),
)
_mutant_values = st.one_of(_json_values, _raw_extremes)
# Strings that mean something to the verifier: artifact kinds, fileset URIs, names no file system accepts.
_HOSTILE = [
    "file", "directory", "fileset", "manifest", "sha256", "blake3", "python-stdlib:", "python-package:",
    "python-package:pip==0", "python-package:==", "python-stdlib:3.11.7", ".", "./", "a/./b", "a//b",
    "manifests/train.json", "manifests/prep.json", "manifests", "keys", "artifacts/train/shards",
    "a" * 300, "/".join(["a" * 255] * 20), "\ud800", "a\ud800", "\udc80", "x/\udfff", "a\x00b", "a\nb",
    "0" * 64 + "\n", "/etc/passwd", "../x", "a\\b", "~", "$HOME", "%s%n", "\u202e", "",
]  # fmt: skip
_hostile_strings = st.sampled_from(_HOSTILE) | st.just(100_000).map(lambda n: "x" * n)


def _render(value: Any, ascii_only: bool) -> str:
    """JSON text of ``value`` (with :class:`Raw` and :class:`Pairs`); NaN/Infinity as Python writes them."""
    if isinstance(value, Raw):
        return value.text
    if isinstance(value, Pairs | dict):
        items = value.items if isinstance(value, Pairs) else tuple(value.items())
        return (
            "{" + ",".join(f"{json.dumps(k, ensure_ascii=ascii_only)}:{_render(v, ascii_only)}" for k, v in items) + "}"
        )
    if isinstance(value, list):
        return "[" + ",".join(_render(v, ascii_only) for v in value) + "]"
    if isinstance(value, int) and not isinstance(value, bool) and abs(value) > 10**4000:
        return Raw("9" * 4500).text  # json.dumps refuses ints this long itself
    return json.dumps(value, ensure_ascii=ascii_only)


def _to_bytes(text: str) -> bytes:
    return text.encode("utf-8", "surrogatepass")  # a lone surrogate becomes invalid UTF-8, as in a hostile file


_OPS = (
    "replace",
    "delete",
    "retype",
    "add_key",
    "dup_key",
    "reorder",
    "dup_item",
    "extreme",
    "truncate_str",
    "hostile",
)


@st.composite
def _mutated(draw: st.DrawFn, base: Any) -> Any:
    """``base`` with one to three structural mutations at random places."""
    value = copy.deepcopy(base)
    for _ in range(draw(st.integers(1, 3))):
        value = _mutate_once(draw, value)
    return value


def _mutate_once(draw: st.DrawFn, root: Any) -> Any:
    parent: Any = None
    key: Any = None
    node = root
    for _ in range(draw(st.integers(0, 7))):
        if isinstance(node, dict) and node:
            k = draw(st.sampled_from(sorted(node)))
        elif isinstance(node, list) and node:
            k = draw(st.integers(0, len(node) - 1))
        else:
            break
        parent, key, node = node, k, node[k]
    op = draw(st.sampled_from(_OPS))
    new: Any = node
    if op == "replace":
        new = draw(_mutant_values)
    elif op == "delete" and parent is not None:
        del parent[key]
        return root
    elif op == "retype":
        new = draw(st.sampled_from(["str", "list", "dict", "null", "number", "bool"]))
        new = {"str": str(node)[:200], "list": [node], "dict": {"v": node}, "null": None, "number": 7, "bool": True}[
            new
        ]
    elif op == "add_key" and isinstance(node, dict):
        node[draw(_text)] = draw(_mutant_values)
    elif op == "dup_key" and isinstance(node, dict) and node:
        k = draw(st.sampled_from(sorted(node)))
        dup = (k, draw(_mutant_values))
        items = tuple(node.items())
        new = Pairs((dup, *items) if draw(st.booleans()) else (*items, dup))
    elif op == "reorder" and isinstance(node, dict | list):
        new = _reordered(node) if isinstance(node, dict) else list(reversed(node))
    elif op == "dup_item" and isinstance(node, list) and node:
        node.append(copy.deepcopy(node[draw(st.integers(0, len(node) - 1))]))
    elif op == "extreme":
        new = draw(_raw_extremes)
    elif op == "hostile":
        suffix = draw(_hostile_strings)
        new = node + suffix if isinstance(node, str) and draw(st.booleans()) else suffix
    elif op == "truncate_str" and isinstance(node, str):
        new = node[: draw(st.integers(0, max(0, len(node) - 1)))]
    if parent is None:
        return new
    parent[key] = new
    return root


@st.composite
def _byte_mutated(draw: st.DrawFn, base: bytes) -> bytes:
    """``base`` with one to four byte-level edits: flip, set, insert, delete, splice, truncate."""
    data = bytearray(base)
    for _ in range(draw(st.integers(1, 4))):
        op = draw(st.sampled_from(["flip", "set", "insert", "delete", "splice", "truncate"]))
        pos = draw(st.integers(0, max(0, len(data) - 1)))
        if op == "flip" and data:
            data[pos] ^= 1 << draw(st.integers(0, 7))
        elif op == "set" and data:
            data[pos] = draw(st.integers(0, 255))
        elif op == "insert":
            data[pos:pos] = draw(
                st.binary(min_size=1, max_size=8) | st.sampled_from([b"[" * 2000, b"9" * 5000, b"\\ud800"])
            )
        elif op == "delete":
            del data[pos : pos + draw(st.integers(1, 16))]
        elif op == "splice" and data:
            start = draw(st.integers(0, len(data) - 1))
            data[pos:pos] = data[start : start + draw(st.integers(1, 64))]
        elif op == "truncate":
            del data[pos:]
    return bytes(data)


# --- a real signed manifest (and the repository's release record) ---------------------------------


@dataclasses.dataclass(frozen=True)
class Signed:
    project: Project
    trusted: dict[str, Ed25519PublicKey]
    path: Path
    """The manifest of a stage with a parent, an input, a file and a directory output."""
    data: bytes
    envelope: dict[str, Any]
    statement: dict[str, Any]
    body: bytes
    target: Path
    """Where each case writes the manifest it verifies."""
    tally: Tally

    def verify(self, test: str, data: bytes) -> Any:
        self.target.write_bytes(data)
        hasher = Hasher(self.project.root, workers=1)
        return self.tally.guard(
            test, lambda: verify_manifest(self.target, root=self.project.root, trusted=self.trusted, hasher=hasher)
        )


@pytest.fixture(scope="module")
def signed(tmp_path_factory: pytest.TempPathFactory, fuzz_tally: Tally) -> Signed:
    root = (tmp_path_factory.mktemp("fuzz") / "proj").resolve()
    (root / ".dvc").mkdir(parents=True)
    signer = init_key(root, key_path=root / ".flowpin" / "keys" / "signing.key")
    project = Project(root=root, signer=signer)
    (root / "inputs").mkdir()
    (root / "inputs" / "corpus.txt").write_text("some text\n")
    (root / "code").mkdir()
    (root / "code" / "stage.py").write_text("print('train')\n")
    project.record_stage("prep", algorithm="sha256")
    file_out, dir_out = project.write_outputs("train")
    # Every kind of pin verify checks: file and directory subjects, an input, a parent manifest, a code
    # file set in the repository and one from an installed package (resolved through its uri).
    with record("train", recipe={"lr": 0.1}, code=["code"], root=root, signer=signer, algorithm="sha256") as rec:
        rec.input("inputs/corpus.txt")
        rec.parent("manifests/prep.json")
        rec.fileset(
            "packages/hypothesis",
            base=python_package_root("hypothesis"),
            files=["hypothesis/version.py"],
            kind="code",
            uri=python_package_uri("hypothesis"),
        )
        rec.output(file_out)
        rec.output(dir_out)
    path = project.manifest_path("train")
    data = path.read_bytes()
    envelope = json.loads(data)
    body = base64.b64decode(envelope["payload"])
    target = root / "manifests" / "fuzzed.json"
    signed = Signed(project, project.trusted(), path, data, envelope, json.loads(body), body, target, fuzz_tally)
    assert signed.verify("setup", data).ok  # the seed itself verifies: mutations start from a valid manifest
    return signed


_RELEASE = sorted((REPO / "manifests").glob("*.json"))[:4]


@pytest.fixture(scope="module")
def release() -> list[tuple[bytes, bytes]]:
    """(file bytes, payload) of a few committed release-record manifests, signed by the repository key."""
    out = []
    for path in _RELEASE:
        data = path.read_bytes()
        out.append((data, base64.b64decode(json.loads(data)["payload"])))
    return out


def _assert_sound(report: Any, signed: Signed) -> None:
    """A manifest that verifies OK carries exactly the statement that was signed."""
    if isinstance(report, FlowpinError) or not report.ok:
        return
    envelope = json.loads(signed.target.read_bytes())
    assert decode_b64(envelope["payload"], "fuzzed") == signed.body


# --- manifest files: parse and verify -------------------------------------------------------------


@given(
    st.one_of(st.binary(max_size=256), _text.map(_to_bytes), _json_values.map(lambda v: _to_bytes(_render(v, False))))
)
def test_parse_manifest_arbitrary_input(fuzz_tally: Tally, data: bytes) -> None:
    result = fuzz_tally.guard("parse_arbitrary", lambda: parse_manifest_bytes(data, "fuzzed.json"))
    assert isinstance(result, FlowpinError | tuple)


@given(_json_values, st.one_of(st.none(), _json_values))
def test_parse_manifest_envelope_shaped(fuzz_tally: Tally, payload: Any, signatures: Any) -> None:
    """Schema-valid envelopes around arbitrary payload JSON reach the statement parser and validator."""
    envelope = {
        "payloadType": PAYLOAD_TYPE,
        "payload": base64.b64encode(_to_bytes(_render(payload, False))).decode(),
        "signatures": signatures if isinstance(signatures, list) else [{"keyid": "k", "sig": "AA=="}],
    }
    data = _to_bytes(_render(envelope, True))
    result = fuzz_tally.guard("parse_envelope_shaped", lambda: parse_manifest_bytes(data, "fuzzed.json"))
    assert isinstance(result, FlowpinError | tuple)


@given(st.data())
def test_verify_byte_mutations_of_a_signed_manifest(signed: Signed, data: st.DataObject) -> None:
    mutant = data.draw(_byte_mutated(signed.data))
    _assert_sound(signed.verify("verify_bytes", mutant), signed)


@given(st.data())
def test_verify_structural_mutations_of_a_signed_manifest(signed: Signed, data: st.DataObject) -> None:
    """Mutate the envelope and/or the statement inside it (not re-signed): never OK, never a crash."""
    envelope: Any = copy.deepcopy(signed.envelope)
    if data.draw(st.booleans(), label="mutate statement"):
        statement = data.draw(_mutated(signed.statement))
        ascii_only = data.draw(st.booleans())
        envelope["payload"] = base64.b64encode(_to_bytes(_render(statement, ascii_only))).decode()
    if data.draw(st.booleans(), label="mutate envelope"):
        envelope = data.draw(_mutated(envelope))
    text = _render(envelope, data.draw(st.booleans()))
    _assert_sound(signed.verify("verify_structure", _to_bytes(text)), signed)


@given(st.data())
def test_verify_resigned_hostile_statements(signed: Signed, data: st.DataObject) -> None:
    """A statement mutated and then signed by the trusted key: every check after the signature (schema,
    names, digests, parents, file sets) must still end in a report or a named error."""
    statement = data.draw(_mutated(signed.statement))
    _check_resigned(signed, "verify_resigned", _to_bytes(_render(statement, data.draw(st.booleans()))))


def _leaf_paths(value: Any, path: tuple[Any, ...] = ()) -> list[tuple[tuple[Any, ...], bool]]:
    """(path, is_key) of every scalar and every object key in ``value``."""
    if isinstance(value, dict):
        out = []
        for k, v in value.items():
            out.append(((*path, k), True))
            out.extend(_leaf_paths(v, (*path, k)))
        return out
    if isinstance(value, list):
        return [leaf for i, v in enumerate(value) for leaf in _leaf_paths(v, (*path, i))]
    return [(path, False)]


@given(st.data())
def test_verify_hostile_leaf_of_resigned_statement(signed: Signed, data: st.DataObject) -> None:
    """One name, kind, uri, digest or key of a valid statement replaced by a hostile string, re-signed."""
    statement = copy.deepcopy(signed.statement)
    leaves = _leaf_paths(statement)
    # Mostly what verify re-checks, each field (name, uri, flowpin.type, sha256, a file key...) equally often.
    fields: dict[str, list[tuple[tuple[Any, ...], bool]]] = collections.defaultdict(list)
    for leaf in leaves:
        if leaf[0][:1] == ("subject",) or "resolvedDependencies" in leaf[0]:
            path, is_key = leaf
            in_files = path[-2:-1] == ("flowpin.files",)  # keys are file names, values digests
            if in_files or not is_key:
                fields[f"flowpin.files {'key' if is_key else 'value'}" if in_files else str(path[-1])].append(leaf)
    pins = st.sampled_from(sorted(fields)).flatmap(lambda field: st.sampled_from(fields[field]))
    path, is_key = data.draw(pins | st.sampled_from(leaves))
    parent = statement
    for step in path[:-1]:
        parent = parent[step]
    old = path[-1] if is_key else parent[path[-1]]
    new = data.draw(
        st.one_of(
            _hostile_strings,
            _hostile_strings.map(lambda h: f"{old}{h}"),
            st.integers(0, len(str(old))).map(lambda k: str(old)[:k]),
            _json_values,
        )
    )
    if is_key:
        if isinstance(new, str):
            parent[new] = parent.pop(old)
    else:
        parent[path[-1]] = new
    # ASCII-escaped: a raw lone surrogate would be invalid UTF-8, refused before any of the checks aimed at here
    _check_resigned(signed, "verify_hostile_leaf", _to_bytes(_render(statement, True)))


def _check_resigned(signed: Signed, test: str, body: bytes) -> None:
    """Sign ``body`` with the trusted key and verify: a report or a named error; OK only if every pin holds."""
    envelope = signed.project.signer.sign(PAYLOAD_TYPE, body)
    report = signed.verify(test, json.dumps(envelope).encode())
    if isinstance(report, FlowpinError) or not report.ok:
        return
    statement = json.loads(body)  # OK => the body is a statement whose every subject re-hashes as pinned
    hasher = Hasher(
        signed.project.root, statement["predicate"]["buildDefinition"]["internalParameters"]["digestAlgorithm"]
    )
    assert report.checked == len(statement["subject"]) + len(
        statement["predicate"]["buildDefinition"]["resolvedDependencies"]
    )
    for subject in statement["subject"]:
        assert subject["digest"][identity_key(hasher.algorithm)] == hasher.digest(subject["name"]).digest


@given(st.data())
def test_parse_and_check_signature_of_release_manifests(
    fuzz_tally: Tally, release: list[tuple[bytes, bytes]], data: st.DataObject
) -> None:
    """Byte mutations of the committed release record: parse, then signature against the repository keys."""
    if not release:
        pytest.skip("no committed manifests")
    seed, body = data.draw(st.sampled_from(release))
    mutant = data.draw(_byte_mutated(seed))
    trusted = load_trust_store(REPO)

    def check() -> bytes:
        envelope, _ = parse_manifest_bytes(mutant, "fuzzed.json")
        verify_envelope(envelope, trusted, "fuzzed.json")
        return decode_b64(envelope["payload"], "fuzzed")

    verified = fuzz_tally.guard("release_bytes", check)
    if isinstance(verified, bytes):
        assert verified == body  # a verified envelope carries the signed payload, whatever else changed


# --- envelopes ------------------------------------------------------------------------------------

_OTHER = Ed25519PrivateKey.from_private_bytes(bytes(range(32)))
_OTHER_SIGNER = Signer(_OTHER, keyid_of(_OTHER.public_key()))


@given(st.data())
def test_verify_envelope_arbitrary_shapes(signed: Signed, data: st.DataObject) -> None:
    """Arbitrary envelope dicts: a keyid comes back only if a trusted key's signature over PAE really verifies."""
    body = signed.body if data.draw(st.booleans()) else data.draw(st.binary(max_size=64))
    good = signed.project.signer.sign(PAYLOAD_TYPE, body)["signatures"][0]  # type: ignore[index]
    other = _OTHER_SIGNER.sign(PAYLOAD_TYPE, body)["signatures"][0]  # type: ignore[index]
    trusted = dict(signed.trusted)
    if data.draw(st.booleans()):
        trusted[_OTHER_SIGNER.keyid] = _OTHER.public_key()
    entry = st.one_of(
        st.sampled_from([good, other]),
        st.fixed_dictionaries(
            {},
            optional={
                "keyid": st.one_of(st.sampled_from([good["keyid"], other["keyid"]]), _json_values),
                "sig": st.one_of(st.sampled_from([good["sig"], other["sig"], "", "AA==", "A"]), _json_values),
                "extra": _json_values,
            },
        ),
        _json_values,
    )
    envelope: dict[str, Any] = data.draw(
        st.fixed_dictionaries(
            {},
            optional={
                "payloadType": st.one_of(st.just(PAYLOAD_TYPE), _text, _json_values),
                "payload": st.one_of(
                    st.just(base64.b64encode(body).decode()),
                    st.binary(max_size=32).map(lambda b: base64.b64encode(b).decode()),
                    _json_values,
                ),
                "signatures": st.one_of(st.lists(entry, max_size=4), _json_values),
            },
        )
    )
    keyid = signed.tally.guard("envelope", lambda: verify_envelope(envelope, trusted, "fuzzed"))
    if isinstance(keyid, FlowpinError):
        return
    assert keyid in trusted
    message = pae(envelope["payloadType"], decode_b64(envelope["payload"], "payload"))
    for sig in envelope["signatures"]:
        signer_id = sig.get("keyid")
        if isinstance(signer_id, str) and signer_id in trusted:  # threshold 1: no trusted signature may be bad
            trusted[signer_id].verify(decode_b64(sig["sig"], "sig"), message)


# --- checkpoint state.json and zstd shards --------------------------------------------------------

_STATE_SEED: dict[str, Any] = {
    "format": "flowpin.checkpoint",
    "version": 1,
    "step": 3,
    "tokens_seen": 96,
    "lr": 0.001,
    "data": {},
    "config": {},
    "files": {
        n: {"sha256": "0" * 64, "size": 1} for n in ("model.safetensors", "optimizer.safetensors", "rng.safetensors")
    },
    "model": {},
    "optimizer": {},
    "rng": {},
}


@given(st.data())
def test_checkpoint_state_parser(fuzz_tally: Tally, data: st.DataObject) -> None:
    from flowpin.train.checkpoint import _parse_state

    raw: bytes
    if data.draw(st.booleans(), label="from the valid seed"):
        raw = _to_bytes(_render(data.draw(_mutated(_STATE_SEED)), data.draw(st.booleans())))
    else:
        raw = data.draw(st.binary(max_size=128))
    result = fuzz_tally.guard("checkpoint_state", lambda: _parse_state(raw, Path("ckpt")))
    assert isinstance(result, FlowpinError | dict)


_zstd_lines = st.lists(
    st.one_of(
        _json_values.map(lambda v: _to_bytes(_render(v, False))),
        st.binary(max_size=16),
        _raw_extremes.map(lambda r: r.text.encode()),
    ),
    max_size=4,
).map(lambda lines: b"".join(line + b"\n" for line in lines))


@pytest.fixture(scope="module")
def shard_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("shards")


@st.composite
def _shard_files(draw: st.DrawFn) -> bytes:
    kind = draw(st.sampled_from(["bytes", "frame", "mutated", "streamed", "skippable"]))
    if kind == "bytes":
        return draw(st.binary(max_size=128))
    content = draw(_zstd_lines | st.binary(max_size=64))
    if kind == "streamed":  # no declared content size
        return zstandard.ZstdCompressor(write_content_size=False).compressobj().compress(content) + b""
    frame = zstandard.ZstdCompressor(level=1, write_content_size=True, write_checksum=draw(st.booleans())).compress(
        content
    )
    if kind == "mutated":
        return draw(_byte_mutated(frame))
    if kind == "skippable":
        return b"\x50\x2a\x4d\x18" + (4).to_bytes(4, "little") + b"skip" + frame
    return frame


@given(_shard_files(), st.sampled_from([0, 16, 1 << 20]), st.booleans())
def test_shard_reader(fuzz_tally: Tally, shard_dir: Path, shard: bytes, cap: int, pin: bool) -> None:
    from flowpin.data.shards import read_shard, read_shard_bytes

    path = shard_dir / "shard-00000.jsonl.zst"
    path.write_bytes(shard)
    expected = None
    if pin:
        try:
            expected = hashlib.sha256(zstandard.ZstdDecompressor().decompress(shard)).hexdigest()
        except zstandard.ZstdError:
            expected = "0" * 64
    data = fuzz_tally.guard(
        "shard_bytes", lambda: read_shard_bytes(path, max_content_size=cap, expected_sha256=expected)
    )
    if isinstance(data, bytes):
        assert len(data) <= cap
        if expected is not None:
            assert hashlib.sha256(data).hexdigest() == expected
    records = fuzz_tally.guard("shard_records", lambda: list(read_shard(path, max_content_size=cap)))
    if isinstance(records, FlowpinError):
        assert isinstance(records, ShardError)
    else:
        assert all(isinstance(r, dict) for r in records)


# --- regressions: each crash the fuzzer found, as a plain test ------------------------------------


def _cyclic() -> list[Any]:
    loop: list[Any] = []
    loop.append(loop)
    return loop


def _deep(n: int) -> list[Any]:
    value: list[Any] = []
    for _ in range(n):
        value = [value]
    return value


def _zstd(content: bytes) -> bytes:
    return zstandard.ZstdCompressor(write_content_size=True).compress(content)


def _envelope_around(body: bytes) -> bytes:
    return json.dumps(
        {"payloadType": PAYLOAD_TYPE, "payload": base64.b64encode(body).decode(), "signatures": []}
    ).encode()


@pytest.mark.parametrize(
    ("call", "error"),
    [
        (lambda: canonical_json(10**5000), CanonicalError),  # was ValueError (int -> str past 4300 digits)
        (lambda: canonical_json(-(2**1100)), CanonicalError),
        (lambda: canonical_json(_deep(5000)), CanonicalError),  # was RecursionError
        (lambda: canonical_json(_cyclic()), CanonicalError),  # was RecursionError
        (lambda: parse_manifest_bytes(b"[" * 100_000, "m"), ManifestParseError),  # was RecursionError
        (lambda: parse_manifest_bytes(b"9" * 5000, "m"), ManifestParseError),  # was ValueError
        (lambda: parse_manifest_bytes(_envelope_around(b"{" * 100_000), "m"), ManifestParseError),
        (lambda: parse_manifest_bytes(_envelope_around(b"[" + b"1" * 5000 + b"]"), "m"), ManifestParseError),
        (  # was UnicodeEncodeError in PAE
            lambda: verify_envelope({"payloadType": "\ud800", "payload": "", "signatures": [{}]}, {}, "m"),
            BadSignatureError,
        ),
        (lambda: _parse_state_of(b"[" * 100_000), ArtifactUnreadableError),  # was RecursionError
        (lambda: _records_of(_zstd(b"[" * 100_000 + b"\n")), ShardError),  # was RecursionError
        (lambda: _index_of(b"[" * 100_000), ShardError),  # was RecursionError
    ],
    ids=[
        "canonical-5000-digit-int",
        "canonical-int-past-double",
        "canonical-deep",
        "canonical-cycle",
        "manifest-deep",
        "manifest-5000-digits",
        "payload-deep",
        "payload-5000-digits",
        "envelope-surrogate-type",
        "state-json-deep",
        "shard-line-deep",
        "index-json-deep",
    ],
)
def test_fuzz_regressions(call: Callable[[], object], error: type[FlowpinError]) -> None:
    with pytest.raises(error):
        call()


def _parse_state_of(raw: bytes) -> object:
    from flowpin.train.checkpoint import _parse_state

    return _parse_state(raw, Path("ckpt"))


def _index_of(raw: bytes) -> object:
    from flowpin.data.shards import read_index

    with tempfile.TemporaryDirectory() as tmp:
        (Path(tmp) / "index.json").write_bytes(raw)
        return read_index(Path(tmp))


def _records_of(shard: bytes) -> object:
    from flowpin.data.shards import read_shard

    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "shard-00000.jsonl.zst"
        path.write_bytes(shard)
        return list(read_shard(path))


@pytest.mark.parametrize(
    ("where", "value", "error"),
    [
        (("subject", 0, "name"), "a\ud800", PathError),  # was UnicodeEncodeError (path.resolve)
        (("subject", 0, "name"), "a" * 5000, ArtifactUnreadableError),  # was OSError ENAMETOOLONG (exists())
        (
            ("predicate", "buildDefinition", "resolvedDependencies", "fileset", "uri"),
            "python-package:",
            ArtifactMissingError,
        ),
        (("predicate", "buildDefinition", "resolvedDependencies", "fileset", "name"), "code\udc80", PathError),
    ],
)
def test_fuzz_regressions_signed(signed: Signed, where: tuple[Any, ...], value: str, error: type[FlowpinError]) -> None:
    """Hostile values in a statement the trusted key signed: a finding of the named error, not a crash."""
    statement = copy.deepcopy(signed.statement)
    parent: Any = statement
    for step in where[:-1]:
        if step == "fileset":  # the code file set in the repository (no uri) or the installed package's
            with_uri = where[-1] == "uri"
            parent = next(
                d for d in parent if d["annotations"]["flowpin.type"] == "fileset" and ("uri" in d) == with_uri
            )
        else:
            parent = parent[step]
    parent[where[-1]] = value
    envelope = signed.project.signer.sign(PAYLOAD_TYPE, _to_bytes(_render(statement, True)))
    report = signed.verify("regression", json.dumps(envelope).encode())
    assert not isinstance(report, FlowpinError)
    assert any(isinstance(f.error, error) for f in report.findings), [str(f) for f in report.findings]
