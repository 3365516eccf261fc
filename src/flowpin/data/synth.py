"""Synthetic verifiable data: arithmetic and math word problems with exact integer answers.

This module owns *generating* problems from a recipe seed, *verifying* their answers by computing them,
and the on-disk form of a task set. A problem is an expression tree (:class:`Num` / :class:`BinOp`) that
is rendered to text and evaluated in exact integer arithmetic; no string is ever evaluated. Every problem
is checked by a round trip before it is admitted: its rendered expression is parsed back by this module's
own parser (:func:`parse_expression`) and must give the same tree and value.

Generators form a registry keyed by task kind (:data:`GENERATORS`). Each (split, kind) pair draws from
its own ``random.Random`` seeded by SHA-256 of the recipe seed, the split and the kind, so adding a kind
or resizing one split never changes another's problems. Held-out problems are generated first; training
problems whose canonical key (the math, not the wording: ``arithmetic|37 + 48 * 2`` or
``word_problem|share|a=12,b=3``) equals a held-out key, or a key already drawn, are regenerated from the
same stream, and the report counts every collision avoided. Train and held-out are therefore disjoint by
construction.

Output: ``<out>/train`` and ``<out>/heldout``, each a dataset (:func:`flowpin.data.shards.write_dataset`)
of records ``{"id": "synth/<split>/<kind>/<n>", "text": "<prompt>\\n<solution>", "source": {...},
"task": {"kind", "prompt", "solution", "answer"}}``. Later stages read tasks back with :func:`load_tasks`
and grade model output with :func:`verify_answer`.
"""

from __future__ import annotations

import dataclasses
import hashlib
import random
import re
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any, Protocol, TypeAlias

from flowpin.data.shards import ShardConfig, ShardInfo, read_dataset, write_dataset
from flowpin.errors import DataError, RecipeError
from flowpin.frozen import FrozenDict
from flowpin.recipe import check_int

SPLITS = ("heldout", "train")
"""Splits in generation order (held-out first, so that its problems never depend on the train size)."""
OPERATORS = ("+", "-", "*", "/")
"""Binary operators an arithmetic recipe may use; ``/`` is exact integer division (never a remainder)."""
ORIGIN = "flowpin-synth"
"""``source.origin`` of every synthetic record."""
LICENSE = "CC0-1.0"
"""``source.license`` of every synthetic record."""
MAX_OPERATIONS = 8
"""Most binary operators in one arithmetic problem."""

_PRECEDENCE = {"+": 1, "-": 1, "*": 2, "/": 2}
_MAX_SAMPLE_TRIES = 10_000
_ANSWER_LINE = re.compile(r"-?(?:0|[1-9][0-9]*)")


# --- expression trees -----------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Num:
    """A non-negative integer literal."""

    value: int


@dataclasses.dataclass(frozen=True)
class BinOp:
    """A binary operation; ``/`` is exact division."""

    op: str
    left: Expr
    right: Expr


Expr: TypeAlias = Num | BinOp


def evaluate(expr: Expr) -> int:
    """The exact integer value of ``expr``; ``ValueError`` on division by zero or an inexact division."""
    if isinstance(expr, Num):
        return expr.value
    a, b = evaluate(expr.left), evaluate(expr.right)
    return _apply(expr.op, a, b)


def _apply(op: str, a: int, b: int) -> int:
    if op == "+":
        return a + b
    if op == "-":
        return a - b
    if op == "*":
        return a * b
    if op == "/":
        if b == 0:
            raise ValueError("division by zero")
        q, r = divmod(a, b)
        if r:
            raise ValueError(f"{a} / {b} is not an integer")
        return q
    raise ValueError(f"unknown operator {op!r}")


def render(expr: Expr) -> str:
    """``expr`` as text with the fewest parentheses that keep its tree under the usual precedence.

    Operators are left-associative, so a right operand of equal precedence is parenthesised
    (``37 + (48 + 2)``): :func:`parse_expression` of the result gives back exactly ``expr``.
    """
    if isinstance(expr, Num):
        return str(expr.value)
    prec = _PRECEDENCE[expr.op]
    left = render(expr.left)
    if isinstance(expr.left, BinOp) and _PRECEDENCE[expr.left.op] < prec:
        left = f"({left})"
    right = render(expr.right)
    if isinstance(expr.right, BinOp) and _PRECEDENCE[expr.right.op] <= prec:
        right = f"({right})"
    return f"{left} {expr.op} {right}"


def parse_expression(text: str) -> Expr:
    """Parse integers, ``+ - * /`` and parentheses (usual precedence, left-associative) into a tree.

    ``ValueError`` on anything else. Used to verify that a rendered problem means what was computed.
    """
    tokens: list[str] = re.findall(r"\d+|[-+*/()]|\S", text)
    pos = 0

    def peek() -> str | None:
        return tokens[pos] if pos < len(tokens) else None

    def take() -> str:
        nonlocal pos
        if pos >= len(tokens):
            raise ValueError(f"{text!r}: unexpected end of expression")
        pos += 1
        return tokens[pos - 1]

    def level(prec: int) -> Expr:
        node = atom() if prec > 2 else level(prec + 1)
        while prec <= 2 and peek() in _OPS_AT[prec]:
            op = take()
            node = BinOp(op, node, level(prec + 1))
        return node

    def atom() -> Expr:
        tok = take()
        if tok == "(":
            node = level(1)
            if take() != ")":
                raise ValueError(f"{text!r}: expected ')'")
            return node
        if tok.isdigit():
            return Num(int(tok))
        raise ValueError(f"{text!r}: unexpected token {tok!r}")

    tree = level(1)
    if pos != len(tokens):
        raise ValueError(f"{text!r}: trailing tokens {tokens[pos:]}")
    return tree


_OPS_AT = {1: ("+", "-"), 2: ("*", "/")}


def steps(expr: Expr) -> list[str]:
    """The worked solution of ``expr``: one ``a op b = c`` per operation, innermost first, left to right."""
    out: list[str] = []

    def walk(node: Expr) -> int:
        if isinstance(node, Num):
            return node.value
        a, b = walk(node.left), walk(node.right)
        c = _apply(node.op, a, b)
        out.append(f"{a} {node.op} {b} = {c}")
        return c

    walk(expr)
    return out


def _values(expr: Expr) -> Iterator[int]:
    """Every intermediate value of ``expr`` (post-order), the final value last."""
    if isinstance(expr, BinOp):
        yield from _values(expr.left)
        yield from _values(expr.right)
        yield _apply(expr.op, evaluate(expr.left), evaluate(expr.right))


def _checked_value(expr: Expr) -> int:
    """Evaluate ``expr`` and prove its rendering parses back to the same tree and value."""
    value = evaluate(expr)
    text = render(expr)
    again = parse_expression(text)
    if again != expr or evaluate(again) != value:
        raise AssertionError(f"rendering {text!r} does not parse back to the generated expression")
    return value


# --- tasks ----------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True, kw_only=True)
class Task:
    """One verifiable problem as later stages see it (midtraining, SFT, DPO, RLVR, eval)."""

    id: str
    """``synth/<split>/<kind>/<n>``."""
    kind: str
    """The generator that made it (a key of :data:`GENERATORS`)."""
    prompt: str
    """The question."""
    solution: str
    """A short worked solution ending in ``Answer: <answer>``."""
    answer: str
    """The exact integer answer in canonical decimal form (``27``, ``-3``)."""

    @property
    def text(self) -> str:
        """What the pretraining mix sees: prompt, newline, solution."""
        return f"{self.prompt}\n{self.solution}"


def extract_answer(text: str) -> str | None:
    """The integer after the last ``Answer:`` in ``text``, or ``None``.

    The rest of that line, stripped and with one trailing ``.`` removed, must be a canonical integer
    (``27``, ``-3``; not ``027``, ``27.5`` or ``27 apples``).
    """
    at = text.rfind("Answer:")
    if at < 0:
        return None
    rest = text[at + len("Answer:") :].split("\n", 1)[0].strip()
    if rest.endswith("."):
        rest = rest[:-1]
    return rest if _ANSWER_LINE.fullmatch(rest) else None


def verify_answer(task: Task, text: str) -> bool:
    """True iff the final ``Answer: N`` in ``text`` is exactly ``task.answer`` (see :func:`extract_answer`)."""
    return extract_answer(text) == task.answer


def task_record(task: Task) -> dict[str, Any]:
    """The dataset record of ``task``."""
    text = task.text
    raw = text.encode("utf-8")
    return {
        "id": task.id,
        "text": text,
        "source": {
            "origin": ORIGIN,
            "generator": task.kind,
            "license": LICENSE,
            "bytes": len(raw),
            "sha256": hashlib.sha256(raw).hexdigest(),
        },
        "task": {"kind": task.kind, "prompt": task.prompt, "solution": task.solution, "answer": task.answer},
    }


def load_tasks(split_dir: Path) -> list[Task]:
    """Read the tasks of one split directory (``data/synth/train``), in order.

    A missing directory or index raises :class:`~flowpin.errors.ShardError`; a record without a valid
    ``task`` raises :class:`~flowpin.errors.DataError` naming it.
    """
    tasks: list[Task] = []
    for i, rec in enumerate(read_dataset(split_dir)):
        task = rec.get("task")
        fields = ("kind", "prompt", "solution", "answer")
        if (
            not isinstance(rec.get("id"), str)
            or not isinstance(task, dict)
            or not all(isinstance(task.get(f), str) for f in fields)
        ):
            raise DataError(
                f"{split_dir} record {i} ({rec.get('id')!r}) has no valid 'task' {{kind, prompt, solution, "
                "answer}}; it is not a synth dataset -- rerun stages/synth.py"
            )
        tasks.append(Task(id=rec["id"], **{f: task[f] for f in fields}))
    return tasks


# --- configs --------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True, kw_only=True)
class RangeConfig:
    """An inclusive integer range."""

    min: int
    """Smallest value."""
    max: int
    """Largest value (>= ``min``)."""

    def validate(self, where: str, *, lowest: int, highest: int | None = None) -> None:
        """Raise :class:`RecipeError` naming ``where.min``/``where.max`` for an invalid bound."""
        check_int(self.min, f"{where}.min", minimum=lowest)
        check_int(self.max, f"{where}.max", minimum=self.min)
        if highest is not None and self.max > highest:
            raise RecipeError(f"{where}.max: {self.max} is above the limit of {highest}")


@dataclasses.dataclass(frozen=True, kw_only=True)
class ArithmeticConfig:
    """Arithmetic expressions, ``What is 37 + 48 * 2?`` (``synth.arithmetic``)."""

    train: int
    """Problems in the train split (0 disables the kind there)."""
    heldout: int
    """Problems in the held-out split."""
    operands: RangeConfig
    """Range every literal is drawn from (min >= 0; no unary minus)."""
    operations: RangeConfig
    """How many binary operators a problem has, drawn uniformly from this range (1..8)."""
    operators: tuple[str, ...]
    """Operators to draw from, a subset of ``+ - * /``. A ``/`` always has a literal divisor that divides
    its left side exactly."""
    allow_negative: bool = False
    """Whether intermediate values and answers may be negative."""
    max_value: int | None = None
    """Largest intermediate value or answer allowed (a draw above it is rejected); ``None``: no cap."""

    def validate(self, where: str) -> None:
        """Raise :class:`RecipeError` naming ``where.<key>`` for the first invalid value."""
        check_int(self.train, f"{where}.train", minimum=0)
        check_int(self.heldout, f"{where}.heldout", minimum=0)
        self.operands.validate(f"{where}.operands", lowest=0)
        self.operations.validate(f"{where}.operations", lowest=1, highest=MAX_OPERATIONS)
        if not isinstance(self.operators, tuple) or not self.operators:
            raise RecipeError(f"{where}.operators: list at least one of {' '.join(OPERATORS)}")
        for j, op in enumerate(self.operators):
            if op not in OPERATORS:
                raise RecipeError(f"{where}.operators[{j}]: {op!r} is not one of {' '.join(OPERATORS)}")
        if len(set(self.operators)) != len(self.operators):
            raise RecipeError(f"{where}.operators: {list(self.operators)} lists an operator twice")
        if self.max_value is not None:
            check_int(self.max_value, f"{where}.max_value", minimum=max(self.operands.max, 1))
        if self.operators == ("/",) and self.operands.max == 0:
            raise RecipeError(f"{where}.operands.max: division needs a non-zero divisor; raise it above 0")


@dataclasses.dataclass(frozen=True, kw_only=True)
class WordProblemConfig:
    """Short math word problems from templates (``synth.word_problem``)."""

    train: int
    """Problems in the train split (0 disables the kind there)."""
    heldout: int
    """Problems in the held-out split."""
    templates: tuple[str, ...] = ()
    """Template names to draw from, uniformly (see :data:`TEMPLATES`); empty: all of them."""

    def validate(self, where: str) -> None:
        """Raise :class:`RecipeError` naming ``where.<key>`` for the first invalid value."""
        check_int(self.train, f"{where}.train", minimum=0)
        check_int(self.heldout, f"{where}.heldout", minimum=0)
        if not isinstance(self.templates, tuple):
            raise RecipeError(f"{where}.templates: must be a list of template names")
        for j, name in enumerate(self.templates):
            if name not in TEMPLATES:
                raise RecipeError(f"{where}.templates[{j}]: {name!r} is not one of {', '.join(TEMPLATES)}")
        if len(set(self.templates)) != len(self.templates):
            raise RecipeError(f"{where}.templates: a template is listed twice")


@dataclasses.dataclass(frozen=True, kw_only=True)
class SynthConfig:
    """The synth recipe (``synth`` in ``params/synth.yaml``). Validated on construction."""

    seed: int
    """Seed of every random choice; each (split, kind) stream is seeded from it, the split and the kind."""
    max_attempts: int
    """Most draws for one problem (collisions and invalid samples included) before the stage gives up
    because the recipe's problem space is too small for the sizes asked."""
    arithmetic: ArithmeticConfig
    """Arithmetic expressions."""
    word_problem: WordProblemConfig
    """Template word problems."""
    shards: ShardConfig
    """Shard size and compression of both splits."""

    def __post_init__(self) -> None:
        self.validate()

    def validate(self, where: str = "synth") -> None:
        """Raise :class:`RecipeError` naming the first invalid key (``synth.arithmetic.operands.max`` ...)."""
        check_int(self.seed, f"{where}.seed", minimum=0)
        check_int(self.max_attempts, f"{where}.max_attempts", minimum=1)
        self.arithmetic.validate(f"{where}.arithmetic")
        self.word_problem.validate(f"{where}.word_problem")
        if sum(getattr(self, kind).train for kind in GENERATORS) == 0:
            raise RecipeError(f"{where}.<kind>.train: every kind has train 0; ask for at least one train problem")
        self.shards.validate(f"{where}.shards")

    def size(self, kind: str, split: str) -> int:
        """How many problems of ``kind`` the recipe asks for in ``split``."""
        return int(getattr(getattr(self, kind), split))


# --- generators -----------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True, kw_only=True)
class Problem:
    """A generated, verified problem before it gets its id."""

    key: str
    """Canonical key of the math (wording excluded); equal keys are the same problem."""
    prompt: str
    """The question."""
    solution: str
    """Worked solution ending in ``Answer: <answer>``."""
    answer: int
    """The exact answer, computed from the expression tree."""


class Generator(Protocol):
    """Draws one candidate problem; ``None`` when the draw broke a rule (negative, inexact division)."""

    def __call__(self, rng: random.Random) -> Problem | None: ...


def _random_tree(rng: random.Random, cfg: ArithmeticConfig, ops: int) -> Expr | None:
    """A random tree with ``ops`` operators (shape, operators and literals uniform); None if invalid."""
    if ops == 0:
        return Num(rng.randint(cfg.operands.min, cfg.operands.max))
    op = rng.choice(cfg.operators)
    if op == "/":
        left = _random_tree(rng, cfg, ops - 1)
        if left is None:
            return None
        dividend = evaluate(left)
        lo = max(cfg.operands.min, 1)
        divisors = [d for d in range(lo, cfg.operands.max + 1) if dividend % d == 0]
        return BinOp(op, left, Num(rng.choice(divisors))) if divisors else None
    n_left = rng.randint(0, ops - 1)
    left = _random_tree(rng, cfg, n_left)
    right = _random_tree(rng, cfg, ops - 1 - n_left)
    if left is None or right is None:
        return None
    return BinOp(op, left, right)


def arithmetic_generator(cfg: ArithmeticConfig) -> Generator:
    """Problems ``What is <expr>?`` solved step by step: ``48 * 2 = 96. 37 + 96 = 133. Answer: 133``."""

    def draw(rng: random.Random) -> Problem | None:
        tree = _random_tree(rng, cfg, rng.randint(cfg.operations.min, cfg.operations.max))
        if tree is None:
            return None
        values = list(_values(tree))
        if (not cfg.allow_negative and min(values) < 0) or (cfg.max_value is not None and max(values) > cfg.max_value):
            return None
        answer = _checked_value(tree)
        expr = render(tree)
        solution = " ".join(f"{step}." for step in steps(tree)) + f" Answer: {answer}"
        return Problem(key=f"arithmetic|{expr}", prompt=f"What is {expr}?", solution=solution, answer=answer)

    return draw


Spec: TypeAlias = str | tuple[str, "Spec", "Spec"]
"""A template's expression: a variable name or ``(op, left, right)``."""


@dataclasses.dataclass(frozen=True, kw_only=True)
class WordTemplate:
    """A word-problem template: text with slots, the expression it asks for, and each variable's range."""

    text: str
    """``str.format`` text; slots ``{name}``, ``{friend}``, ``{item}``, ``{items}`` and the variables."""
    expr: Spec
    """The expression whose value answers the question."""
    ranges: Mapping[str, tuple[int, int]]
    """Inclusive range of each variable."""


# Compact on purpose: every numeric variable is mentioned early in the prompt and again at the start of
# the solution, with at most 12 words between two mentions, so every 13-word window of a problem's text
# holds all of its numbers. Two problems with different keys then share no 13-gram of the same template,
# and the decontaminate stage finds train and held-out disjoint at its default n (see tests/data/test_synth.py).
TEMPLATES: dict[str, WordTemplate] = {
    "buy_groups": WordTemplate(
        text="{name} has {a} {items} and buys {b} bags of {c} more. How many {items} now?",
        expr=("+", "a", ("*", "b", "c")),
        ranges=FrozenDict({"a": (2, 40), "b": (2, 9), "c": (2, 12)}),
    ),
    "give_away": WordTemplate(
        text="{name} has {a} {items} and gives {b} to {friend}. How many are left?",
        expr=("-", "a", "b"),
        ranges=FrozenDict({"a": (5, 99), "b": (1, 60)}),
    ),
    "share": WordTemplate(
        text="{name} shares {a} {items} equally among {b} friends. How many does each get?",
        expr=("/", "a", "b"),
        ranges=FrozenDict({"a": (4, 120), "b": (2, 12)}),
    ),
    "found_lost": WordTemplate(
        text="{name} had {a} {items}, found {b} more and lost {c}. How many remain?",
        expr=("-", ("+", "a", "b"), "c"),
        ranges=FrozenDict({"a": (3, 60), "b": (1, 40), "c": (1, 50)}),
    ),
    "chairs": WordTemplate(
        text="A hall has {a} rows of {b} chairs; {c} are taken. How many are free?",
        expr=("-", ("*", "a", "b"), "c"),
        ranges=FrozenDict({"a": (2, 15), "b": (3, 20), "c": (1, 150)}),
    ),
    "savings": WordTemplate(
        text="{name} saves {a} dollars a week for {b} weeks, then spends {c}. What is left?",
        expr=("-", ("*", "a", "b"), "c"),
        ranges=FrozenDict({"a": (2, 25), "b": (2, 12), "c": (1, 200)}),
    ),
    "change": WordTemplate(
        text="{name} pays {c} dollars for {b} {items} at {a} dollars each. What is the change?",
        expr=("-", "c", ("*", "b", "a")),
        ranges=FrozenDict({"a": (1, 15), "b": (2, 9), "c": (20, 150)}),
    ),
    "reading": WordTemplate(
        text="{name} reads {a} pages daily for {b} days, then {c} more. How many in all?",
        expr=("+", ("*", "a", "b"), "c"),
        ranges=FrozenDict({"a": (3, 40), "b": (2, 14), "c": (1, 30)}),
    ),
    "boxes_shared": WordTemplate(
        text="{name} splits {a} boxes of {b} {items} evenly among {c} friends. What does each get?",
        expr=("/", ("*", "a", "b"), "c"),
        ranges=FrozenDict({"a": (2, 12), "b": (2, 12), "c": (2, 10)}),
    ),
    "times_as_many": WordTemplate(
        text="{name} has {a} {items}; {friend} has {b} times as many. How many in total?",
        expr=("+", "a", ("*", "a", "b")),
        ranges=FrozenDict({"a": (2, 30), "b": (2, 9)}),
    ),
    "more_than": WordTemplate(
        text="{name} has {a} {items} and {friend} has {b}. How many more does {name} have?",
        expr=("-", "a", "b"),
        ranges=FrozenDict({"a": (10, 99), "b": (1, 80)}),
    ),
}
"""Word-problem templates by name, in recipe order when ``synth.word_problem.templates`` is empty."""

NAMES = (
    "Ana", "Ben", "Chen", "Dara", "Eli", "Fatima", "Gus", "Hana", "Ivan", "Jada", "Kofi", "Lena", "Mateo",
    "Nia", "Omar", "Priya", "Quinn", "Rosa", "Sami", "Tariq", "Uma", "Vera", "Yusuf", "Zoe",
)  # fmt: skip
"""Names a template's ``{name}`` and ``{friend}`` are drawn from (never the same one twice)."""
ITEMS = (
    ("apple", "apples"), ("pencil", "pencils"), ("sticker", "stickers"), ("marble", "marbles"),
    ("cookie", "cookies"), ("book", "books"), ("card", "cards"), ("shell", "shells"), ("stamp", "stamps"),
    ("balloon", "balloons"), ("orange", "oranges"), ("crayon", "crayons"), ("bead", "beads"),
    ("kite", "kites"), ("lemon", "lemons"), ("notebook", "notebooks"),
)  # fmt: skip
"""Countable items (singular, plural) a template's ``{item}``/``{items}`` are drawn from; one word each."""


def _spec_tree(spec: Spec, values: Mapping[str, int]) -> Expr:
    if isinstance(spec, str):
        return Num(values[spec])
    op, left, right = spec
    return BinOp(op, _spec_tree(left, values), _spec_tree(right, values))


def word_problem_generator(cfg: WordProblemConfig) -> Generator:
    """Template problems solved in one line: ``12 + 3 * 5 = 27. Answer: 27``. Answers are >= 1 and every
    intermediate value is >= 0; divisions are exact."""
    names = list(cfg.templates) or list(TEMPLATES)

    def draw(rng: random.Random) -> Problem | None:
        name = rng.choice(names)
        tpl = TEMPLATES[name]
        values = {var: rng.randint(lo, hi) for var, (lo, hi) in sorted(tpl.ranges.items())}
        person, friend = rng.sample(NAMES, 2)
        item, items = rng.choice(ITEMS)
        tree = _spec_tree(tpl.expr, values)
        try:
            if any(v < 0 for v in _values(tree)):
                return None
            answer = _checked_value(tree)
        except ValueError:  # an inexact division: draw again
            return None
        if answer < 1:
            return None
        prompt = tpl.text.format(name=person, friend=friend, item=item, items=items, **values)
        key = f"word_problem|{name}|" + ",".join(f"{k}={v}" for k, v in sorted(values.items()))
        return Problem(key=key, prompt=prompt, solution=f"{render(tree)} = {answer}. Answer: {answer}", answer=answer)

    return draw


GENERATORS: dict[str, Callable[[SynthConfig], Generator]] = {
    "arithmetic": lambda cfg: arithmetic_generator(cfg.arithmetic),
    "word_problem": lambda cfg: word_problem_generator(cfg.word_problem),
}
"""Task kinds in output order, each with a factory for its generator. A kind's config is the
:class:`SynthConfig` field of the same name and has ``train``/``heldout`` sizes."""


def stream_seed(seed: int, split: str, kind: str) -> int:
    """The seed of the (split, kind) random stream: the first 8 bytes of SHA-256 of the three, big-endian."""
    digest = hashlib.sha256(f"flowpin.synth\0{seed}\0{split}\0{kind}".encode()).digest()
    return int.from_bytes(digest[:8], "big")


# --- generating -----------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True, kw_only=True)
class SynthData:
    """What :func:`generate` made: tasks per split (kinds in registry order) and the report."""

    splits: dict[str, list[Task]]
    """``train`` and ``heldout`` tasks."""
    report: dict[str, Any]
    """Per split and kind: tasks, collisions avoided (held-out keys, duplicates), invalid draws, answers."""


def generate(cfg: SynthConfig) -> SynthData:
    """Generate both splits of ``cfg`` (pure: no I/O; the same recipe gives the same tasks)."""
    cfg.validate()
    seen: dict[str, str] = {}  # key -> split that holds it
    splits: dict[str, list[Task]] = {}
    report: dict[str, Any] = {}
    for split in SPLITS:
        tasks: list[Task] = []
        kinds_report: dict[str, Any] = {}
        for kind, factory in GENERATORS.items():
            draw = factory(cfg)
            rng = random.Random(stream_seed(cfg.seed, split, kind))  # noqa: S311 -- reproducible, not secret
            stats = {"heldout_collisions_avoided": 0, "duplicates_avoided": 0, "invalid_draws": 0}
            answers: list[int] = []
            for n in range(cfg.size(kind, split)):
                problem = _draw_new(draw, rng, seen, split, stats, cfg.max_attempts, f"synth.{kind}", n)
                seen[problem.key] = split
                answers.append(problem.answer)
                tasks.append(
                    Task(
                        id=f"synth/{split}/{kind}/{n}",
                        kind=kind,
                        prompt=problem.prompt,
                        solution=problem.solution,
                        answer=str(problem.answer),
                    )
                )
            kinds_report[kind] = {
                "tasks": len(answers),
                **stats,
                "answers": {"min": min(answers), "max": max(answers)} if answers else None,
            }
        splits[split] = tasks
        report[split] = {"tasks": len(tasks), "by_kind": kinds_report}
    collisions = {
        "heldout": sum(k["heldout_collisions_avoided"] for s in report.values() for k in s["by_kind"].values()),
        "duplicates": sum(k["duplicates_avoided"] for s in report.values() for k in s["by_kind"].values()),
    }
    return SynthData(splits=splits, report={"seed": cfg.seed, "splits": report, "collisions_avoided": collisions})


def _draw_new(
    draw: Generator,
    rng: random.Random,
    seen: Mapping[str, str],
    split: str,
    stats: dict[str, int],
    max_attempts: int,
    where: str,
    n: int,
) -> Problem:
    """Draw until a valid problem whose key is new; count what was rejected on the way."""
    for _ in range(max_attempts):
        problem = draw(rng)
        if problem is None:
            stats["invalid_draws"] += 1
            continue
        holder = seen.get(problem.key)
        if holder is None:
            return problem
        if holder != split:
            stats["heldout_collisions_avoided"] += 1
        else:
            stats["duplicates_avoided"] += 1
    raise RecipeError(
        f"{where}.{split}: after {max_attempts} draws no new valid problem was found for problem {n} of {split} "
        f"(the problem space is too small for the sizes asked); lower {where}.{split}, widen {where}'s ranges, "
        "or raise synth.max_attempts"
    )


@dataclasses.dataclass(frozen=True, kw_only=True)
class SynthResult:
    """What :func:`run_synth` wrote."""

    tasks: dict[str, int]
    """Tasks per split."""
    shards: dict[str, tuple[ShardInfo, ...]]
    """Shards per split."""
    report: dict[str, Any]
    """The generation report plus per-split shard stats (also in each split's ``index.json``)."""


def run_synth(cfg: SynthConfig, out_dir: Path) -> SynthResult:
    """Generate ``cfg`` and write ``out_dir/train`` and ``out_dir/heldout`` (each a dataset).

    ``out_dir`` must hold no shards yet; the stage wraps it in ``atomic_directory``.
    """
    data = generate(cfg)
    shards: dict[str, tuple[ShardInfo, ...]] = {}
    report = {**data.report, "splits": dict(data.report["splits"])}
    for split in SPLITS:
        tasks = data.splits[split]
        infos = write_dataset(
            (task_record(t) for t in tasks),
            out_dir / split,
            docs_per_shard=cfg.shards.docs_per_shard,
            level=cfg.shards.zstd_level,
            meta={"split": split, "synth": data.report["splits"][split]},
        )
        shards[split] = tuple(infos)
        report["splits"][split] = {
            **report["splits"][split],
            "shards": len(infos),
            "bytes": sum(i.uncompressed_bytes for i in infos),
        }
    return SynthResult(tasks={s: len(data.splits[s]) for s in SPLITS}, shards=shards, report=report)
