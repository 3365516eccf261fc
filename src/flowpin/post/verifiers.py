"""Programmatic verifiers: the one way flowpin grades a model's answer to a verifiable task.

RLVR rewards (:mod:`flowpin.post.rlvr`), eval pass@1 (:mod:`flowpin.post.eval`) and the held-out checks of
the post-training stages all grade through this registry, never through
:func:`flowpin.data.synth.verify_answer` directly, so a new task kind or verifier is added in one place.

A verifier is a pure function ``verifier(task, text) -> float`` in ``[0, 1]`` of a task and the model's
response text (what follows the prompt, as :meth:`flowpin.post.prompts.Vocab.decode` returns it). It
draws no random numbers, reads no files and never evaluates model output as code.

The API is deliberately small:

* :func:`verify` -- ``True`` iff ``text`` solves ``task``, by the verifier of ``task.kind``: *the* correctness
  check (``GRADER`` is its qualified name, as reports write it);
* :func:`verifier_for` -- the correctness verifier of a task kind (a reward function, e.g. for RLVR);
* :func:`verifiers_by_kind` -- checks every kind of a task set has a verifier (before any model runs) and
  names each one, for reports;
* :func:`get_verifier` -- a verifier by name (a recipe key): an unknown name raises :class:`RecipeError`
  listing the known ones;
* :data:`VERIFIERS` -- the registry, name -> verifier (read-only);
* :data:`KIND_VERIFIERS` -- which verifier grades each task kind (``flowpin.data.synth.GENERATORS``).

A task kind without a verifier is a :class:`DataError` (the data holds a kind this code cannot grade).

Both synth kinds (``arithmetic``, ``word_problem``) have exact integer answers, graded by
:func:`flowpin.data.synth.verify_answer`: the last ``Answer: N`` line must be exactly the canonical
integer (``27`` -- not ``027``, ``27.0`` or ``27 apples``). To add a verifier, write the function here and
add it to ``_VERIFIERS``; a new task kind also needs an entry in ``_KIND_VERIFIERS`` (a test checks that
every synth kind has one).
"""

from __future__ import annotations

import types
from collections.abc import Callable, Iterable, Mapping

from flowpin.data.synth import Task, extract_answer, verify_answer
from flowpin.errors import DataError, RecipeError

Verifier = Callable[[Task, str], float]
"""``verifier(task, text) -> reward`` in ``[0, 1]``; deterministic and side-effect free."""


def exact_integer(task: Task, text: str) -> float:
    """1.0 iff the final ``Answer: N`` of ``text`` is exactly ``task.answer`` (else 0.0, malformed included)."""
    return 1.0 if verify_answer(task, text) else 0.0


def answer_format(task: Task, text: str) -> float:
    """1.0 iff ``text`` ends its reasoning in a well-formed ``Answer: <integer>`` line, right or wrong.

    Not a correctness check: a format rate for reports (how often the model answers at all).
    """
    del task
    return 1.0 if extract_answer(text) is not None else 0.0


_VERIFIERS: dict[str, Verifier] = {
    "exact_integer": exact_integer,
    "answer_format": answer_format,
}
_KIND_VERIFIERS: dict[str, str] = {
    "arithmetic": "exact_integer",
    "word_problem": "exact_integer",
}

VERIFIERS: Mapping[str, Verifier] = types.MappingProxyType(_VERIFIERS)
"""Every verifier by name (read-only view)."""
KIND_VERIFIERS: Mapping[str, str] = types.MappingProxyType(_KIND_VERIFIERS)
"""Task kind -> the name of the verifier that decides whether an answer is correct (read-only view)."""


def get_verifier(name: str, *, where: str = "verifier") -> Verifier:
    """The verifier called ``name``; :class:`RecipeError` naming ``where`` and the known names otherwise."""
    verifier = _VERIFIERS.get(name) if isinstance(name, str) else None
    if verifier is None:
        raise RecipeError(f"{where}: unknown verifier {name!r}; known: {', '.join(sorted(_VERIFIERS))}")
    return verifier


def verifier_for(kind: str) -> Verifier:
    """The correctness verifier of task kind ``kind``; :class:`DataError` for a kind without one."""
    name = _KIND_VERIFIERS.get(kind)
    if name is None:
        raise DataError(
            f"task kind {kind!r} has no verifier (kinds with one: {', '.join(sorted(_KIND_VERIFIERS))}); add it to "
            "flowpin.post.verifiers._KIND_VERIFIERS"
        )
    return _VERIFIERS[name]


def verify(task: Task, text: str) -> bool:
    """Whether ``text`` solves ``task``: the verifier of ``task.kind`` (:data:`KIND_VERIFIERS`) gives it the full
    reward. A kind without a verifier is a :class:`DataError`."""
    return verifier_for(task.kind)(task, text) >= 1.0


GRADER = "flowpin.post.verifiers.verify"
"""The qualified name of :func:`verify`, as a report names its grader (``eval.json``'s ``tasks.verifier``)."""


def verifiers_by_kind(kinds: Iterable[str]) -> dict[str, str]:
    """Kind -> the name of its verifier, for each of ``kinds`` in order; a kind without one is a
    :class:`DataError` (call it before any model runs, so a set that cannot be graded fails first)."""
    names: dict[str, str] = {}
    for kind in kinds:
        verifier_for(kind)  # the DataError naming a kind without a verifier
        names[kind] = _KIND_VERIFIERS[kind]
    return names


__all__ = [
    "GRADER",
    "KIND_VERIFIERS",
    "VERIFIERS",
    "Verifier",
    "answer_format",
    "exact_integer",
    "get_verifier",
    "verifier_for",
    "verifiers_by_kind",
    "verify",
]
