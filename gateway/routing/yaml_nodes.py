"""Walking a composed YAML node tree while keeping every node's position.

`gateway.routing.config` reads routes.yaml through `yaml.compose()` instead of `yaml.safe_load()` because the
loaded Python objects have forgotten where they came from, have silently dropped duplicate keys, and have
already turned version ids such as `2.2` into floats and `2026-11-05` into dates. The helpers here keep the
nodes, report problems against their marks, and hand out raw scalar text.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

import yaml
from yaml.nodes import MappingNode, Node, ScalarNode, SequenceNode

T = TypeVar("T")

NULL_TAG = "tag:yaml.org,2002:null"
MERGE_TAG = "tag:yaml.org,2002:merge"

# A metadata block is reported by the admin API; aliases of aliases can make a few lines expand into
# billions of values, so anything past this is refused rather than built.
MAX_METADATA_VALUES = 10_000


@dataclass(frozen=True, slots=True)
class ConfigIssue:
    """One problem in a routes file, at a 1-based line and column."""

    file: str
    line: int
    column: int
    message: str

    def __str__(self) -> str:
        return f"{self.file}:{self.line}:{self.column}: {self.message}"


class ConfigError(Exception):
    """A routes file that cannot be used; `issues` lists every problem found, in file order."""

    def __init__(self, issues: Sequence[ConfigIssue]) -> None:
        self.issues: list[ConfigIssue] = list(issues)
        super().__init__("\n".join(str(issue) for issue in self.issues))


class Problems:
    """Collects issues during one validation pass, so one run reports all of them at once."""

    def __init__(self, source: str) -> None:
        self.source = source
        self._issues: list[ConfigIssue] = []

    def add(self, node: Node, message: str) -> None:
        mark = node.start_mark
        self._issues.append(ConfigIssue(self.source, mark.line + 1, mark.column + 1, message))

    def __bool__(self) -> bool:
        return bool(self._issues)

    def issues(self) -> list[ConfigIssue]:
        # A node reached through several YAML aliases can be reported more than once; say it once.
        unique = dict.fromkeys(self._issues)
        return sorted(unique, key=lambda issue: (issue.line, issue.column))


@dataclass(frozen=True, slots=True)
class Entry:
    """One `key: value` pair of a mapping, with both nodes for positions."""

    key: str
    key_node: Node
    value: Node


Fields = dict[str, Entry]


def compose(text: str, source: str) -> Node | None:
    """The node tree of a single YAML document, or ConfigError at the place the YAML stops making sense."""
    try:
        node: Node | None = yaml.compose(text, Loader=yaml.SafeLoader)
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark or exc.context_mark
        line, column = (mark.line + 1, mark.column + 1) if mark is not None else (1, 1)
        raise ConfigError([ConfigIssue(source, line, column, _syntax_message(exc, text))]) from None
    except yaml.reader.ReaderError as exc:  # a character YAML refuses carries an index but no mark
        line = text.count("\n", 0, exc.position) + 1
        column = exc.position - (text.rfind("\n", 0, exc.position) + 1) + 1
        message = f"YAML error: character #x{exc.character:04x} is not allowed in YAML text"
        raise ConfigError([ConfigIssue(source, line, column, message)]) from None
    except RecursionError:
        raise ConfigError([ConfigIssue(source, 1, 1, "YAML is nested too deeply to read")]) from None
    return node


def _syntax_message(exc: yaml.MarkedYAMLError, text: str) -> str:
    problem = exc.problem or "invalid YAML"
    mark = exc.problem_mark
    if mark is not None and text[mark.index - 1 : mark.index + 1] == "${":
        # Inside {...} a brace ends the plain scalar, so an unquoted ${VAR} breaks the YAML itself.
        return 'YAML syntax error: quote values that use ${VAR} inside a {...} mapping, like "${VAR}"'
    if "'\\t'" in problem:
        return "YAML syntax error: a tab character here; YAML indents with spaces only"
    if exc.context == "expected a single document in the stream":
        return "YAML syntax error: a second document starts here (---); routes.yaml holds exactly one"
    if problem == "mapping values are not allowed here":
        return (
            "YAML syntax error: a ':' here that YAML cannot place; quote a value that contains ': ', "
            "or check the indentation of this line"
        )
    context = f" ({exc.context})" if exc.context else ""
    return f"YAML syntax error: {problem}{context}"


def is_null(node: Node) -> bool:
    """True for an empty value (`key:`), `~` or `null`, which optional sections treat as absent."""
    return isinstance(node, ScalarNode) and node.tag == NULL_TAG


def describe(node: Node) -> str:
    """How a node reads in a message that says what was expected instead."""
    if isinstance(node, MappingNode):
        return "a mapping"
    if isinstance(node, SequenceNode):
        return "a list"
    if is_null(node):
        return "empty"
    return f"'{node.value}'"


def fields(node: Node, problems: Problems, what: str, _active: frozenset[int] = frozenset()) -> Fields | None:
    """A mapping's entries by raw key text, in file order; None (reported) if it is not a mapping.

    Duplicate keys are reported, and the first one is kept. YAML merge keys (`<<: *defaults`) are honoured,
    with keys written out in the mapping winning over merged ones, as in YAML's merge rules.
    """
    if not isinstance(node, MappingNode):
        problems.add(node, f"{what} must be a mapping of key: value, not {describe(node)}")
        return None
    if id(node) in _active:
        problems.add(node, f"{what} merges itself through a YAML alias")
        return None
    active = _active | {id(node)}
    explicit = {k.value for k, _ in node.value if isinstance(k, ScalarNode) and k.tag != MERGE_TAG}
    result: Fields = {}
    for key_node, value in node.value:
        if key_node.tag == MERGE_TAG:
            sources = value.value if isinstance(value, SequenceNode) else [value]
            for source in sources:
                merged = fields(source, problems, f"the mapping merged into {what}", active)
                for key, entry in (merged or {}).items():
                    if key not in explicit and key not in result:
                        result[key] = entry
            continue
        if not isinstance(key_node, ScalarNode):
            problems.add(key_node, f"keys in {what} must be plain text, not {describe(key_node)}")
            continue
        key = key_node.value
        first = result.get(key)
        if first is not None and key in explicit:
            line = first.key_node.start_mark.line + 1
            problems.add(key_node, f"duplicate key '{key}' in {what} (first written on line {line})")
            continue
        result[key] = Entry(key, key_node, value)
    return result


def unknown_keys(entries: Fields, known: Sequence[str], problems: Problems, what: str) -> None:
    for key, entry in entries.items():
        if key not in known:
            expected = ", ".join(known)
            problems.add(entry.key_node, f"unknown key '{key}' in {what}; expected one of: {expected}")


_ENV_REF = re.compile(r"\$(\$)?\{(?:([A-Za-z_][A-Za-z0-9_]*)(?::-([^}]*))?\})?")


def expand_env(text: str, env: Mapping[str, str]) -> tuple[str, list[str]]:
    """`${VAR}` and `${VAR:-default}` replaced from env, and the problems found; `$${` is a literal `${`.

    As in the shell, the default also applies when VAR is set but empty.
    """
    errors: list[str] = []

    def replace(match: re.Match[str]) -> str:
        if match[1]:
            return match[0][1:]
        name, default = match[2], match[3]
        if name is None:
            errors.append("has a malformed ${...} reference; write ${NAME} or ${NAME:-default}")
            return match[0]
        value = env.get(name, "")
        if value:
            return value
        if default is not None:
            return default
        if name in env:
            errors.append(f"uses ${{{name}}}, but {name} is empty; set it or write ${{{name}:-default}}")
        else:
            errors.append(f"uses ${{{name}}}, but {name} is not set; set it or write ${{{name}:-default}}")
        return ""

    return _ENV_REF.sub(replace, text), errors


def scalar(node: Node, problems: Problems, env: Mapping[str, str], what: str) -> str | None:
    """The scalar's raw text with environment references expanded; None (reported) if there is none."""
    if is_null(node):
        problems.add(node, f"{what} is empty")
        return None
    if not isinstance(node, ScalarNode):
        problems.add(node, f"{what} must be a single value, not {describe(node)}")
        return None
    text, errors = expand_env(node.value, env)
    for error in errors:
        problems.add(node, f"{what} {error}")
    return None if errors else text


class _Cycle(Exception):
    def __init__(self, node: Node) -> None:
        self.node = node


class _TooLarge(Exception):
    pass


_INT = re.compile(r"[-+]?(?:0|[1-9][0-9]*)|0o[0-7]+|0x[0-9a-fA-F]+")
# A point is required, as in YAML 1.1: a short commit id such as 1234e56 is hex, not 1.234e59.
_FLOAT = re.compile(r"[-+]?(?:[0-9]+\.[0-9]*|\.[0-9]+)(?:[eE][-+]?[0-9]+)?")
_SPECIAL_FLOATS = {".inf": "inf", "+.inf": "inf", "-.inf": "-inf", ".nan": "nan"}
_BOOLS = {"true": True, "false": False}
_RESOLVER = yaml.resolver.Resolver()


def _plain_scalar(node: ScalarNode, text: str) -> Any:
    """A metadata value as a person means it: numbers, booleans and nulls of YAML 1.2, everything else text.

    Close to YAML 1.2's core schema rather than PyYAML's 1.1 rules, so that `12:30` is not read as 750, `no`
    stays a word and dates stay as written; digits with a leading zero (a commit id like `0123456`) stay text.
    """
    # An explicit tag (`!!str 2.2`) is the only case where the node's tag differs from what PyYAML would
    # resolve for the same plain text; the stubs leave `resolve` untyped.
    resolved = _RESOLVER.resolve(ScalarNode, node.value, (True, False))  # type: ignore[no-untyped-call]
    implicit = node.style is None and node.tag == resolved
    tag = node.tag if not implicit else None
    lowered = text.lower()
    if tag == "tag:yaml.org,2002:int" or (tag is None and _INT.fullmatch(text)):
        try:
            return int(text, 0) if text[:2] in ("0o", "0x") else int(text)
        except ValueError:
            return text
    if tag == "tag:yaml.org,2002:float" or (
        tag is None and (_FLOAT.fullmatch(text) or lowered in _SPECIAL_FLOATS)
    ):
        try:
            return float(_SPECIAL_FLOATS.get(lowered, text))
        except ValueError:
            return text
    if tag in ("tag:yaml.org,2002:bool", None) and lowered in _BOOLS:
        return _BOOLS[lowered]
    if tag in (NULL_TAG, None) and lowered in ("", "~", "null"):
        return None
    return text


def plain(node: Node, problems: Problems, env: Mapping[str, str], what: str) -> Any:
    """Any YAML value as plain Python (dict, list, str, int, float, bool, None); None (reported) if unusable.

    Mapping keys stay raw text so the result serialises to JSON as written.
    """
    count = 0

    def convert(current: Node, active: frozenset[int]) -> Any:
        nonlocal count
        count += 1
        if count > MAX_METADATA_VALUES:
            raise _TooLarge
        if id(current) in active:
            raise _Cycle(current)
        inside = active | {id(current)}
        if isinstance(current, MappingNode):
            entries = fields(current, problems, what) or {}
            return {key: convert(entry.value, inside) for key, entry in entries.items()}
        if isinstance(current, SequenceNode):
            return [convert(item, inside) for item in current.value]
        assert isinstance(current, ScalarNode)
        text, errors = expand_env(current.value, env)
        for error in errors:
            problems.add(current, f"{what} {error}")
        return _plain_scalar(current, text)

    try:
        return convert(node, frozenset())
    except _TooLarge:
        problems.add(node, f"{what} is too large: over {MAX_METADATA_VALUES} values once YAML aliases expand")
    except _Cycle as cycle:
        problems.add(cycle.node, f"{what} contains itself through a YAML alias; it must be a tree")
    return None


def checked(
    node: Node,
    problems: Problems,
    env: Mapping[str, str],
    what: str,
    parse: Callable[[str], T],
) -> T | None:
    """`parse` applied to the scalar's text; a ValueError from it becomes "`what` `message`" at the node."""
    text = scalar(node, problems, env, what)
    if text is None:
        return None
    try:
        return parse(text)
    except ValueError as exc:
        problems.add(node, f"{what} {exc}")
        return None
