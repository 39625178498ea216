"""YAML as a person means it: the YAML 1.2 core schema, for configs, search spaces and `--set`.

PyYAML reads YAML 1.1, where `yes`/`no`/`on`/`off` are booleans, `010` is octal 8, `1e-1` is a
string (a 1.1 float needs a dot) and `2024-01-01` a date. raypo reads the 1.2 core schema
instead: `true`/`false` are the only booleans, `1e-1` is 0.1, `yes` is the string "yes".

On top of 1.2, integers written with a leading zero, in hexadecimal or in octal (`010`,
`0x10`, `0o10`) are refused rather than read: YAML 1.1, YAML 1.2 and people disagree on what
`010` is, and a hexadecimal seed or step count is far more likely a slip than a wish. The
error names the file (or `--set`), the key and the decimal to write. A key given twice in one
mapping is refused too (PyYAML would keep the last silently).
"""

from __future__ import annotations

import math
import re
from typing import Any

import yaml

_INT = re.compile(r"^[-+]?[0-9]+$|^0o[0-7]+$|^0x[0-9a-fA-F]+$")
_FLOAT = re.compile(r"^[-+]?(?:\.[0-9]+|[0-9]+(?:\.[0-9]*)?)(?:[eE][-+]?[0-9]+)?$"
                    r"|^[-+]?\.(?:inf|Inf|INF)$|^\.(?:nan|NaN|NAN)$")
_BOOL = re.compile(r"^(?:true|True|TRUE|false|False|FALSE)$")
_NULL = re.compile(r"^(?:~|null|Null|NULL|)$")


class Ambiguous:
    """A scalar that is refused (see the module docstring); reported with its key."""

    def __init__(self, text: str, value: int):
        self.text, self.value = text, value

    def problem(self) -> str:
        if self.text.lstrip("+-").startswith(("0x", "0o")):
            kind = "a hexadecimal" if "x" in self.text else "an octal"
            return (f"{self.text!r} is {kind} literal; write the decimal {self.value} "
                    "(or quote it for a string)")
        return (f"{self.text!r} has a leading zero (YAML 1.1 reads such a number as octal, "
                f"YAML 1.2 as decimal); write {self.value} (or quote it for a string)")


class Loader(yaml.SafeLoader):
    """SafeLoader with the YAML 1.2 core schema's implicit types."""


Loader.yaml_implicit_resolvers = {}
for tag, pattern, first in (
        ("tag:yaml.org,2002:bool", _BOOL, "tTfF"),
        ("tag:yaml.org,2002:int", _INT, "-+0123456789"),
        ("tag:yaml.org,2002:float", _FLOAT, "-+0123456789."),
        ("tag:yaml.org,2002:null", _NULL, ["~", "n", "N", ""])):
    Loader.add_implicit_resolver(tag, pattern, list(first))


def _int(loader: Loader, node: yaml.ScalarNode):
    text = loader.construct_scalar(node)
    digits = text.lstrip("+-")
    if digits.startswith(("0x", "0o")):
        return Ambiguous(text, int(text, 0))
    if len(digits) > 1 and digits.startswith("0"):
        return Ambiguous(text, int(text, 10))
    return int(text, 10)


def _float(loader: Loader, node: yaml.ScalarNode) -> float:
    text = loader.construct_scalar(node).lower()
    if text.lstrip("+-") == ".inf":
        return -math.inf if text.startswith("-") else math.inf
    if text == ".nan":
        return math.nan
    return float(text)


def _bool(loader: Loader, node: yaml.ScalarNode) -> bool:
    return loader.construct_scalar(node).lower() == "true"


def _mapping(loader: Loader, node: yaml.MappingNode, deep: bool = False) -> dict:
    loader.flatten_mapping(node)
    seen: dict = {}
    for key_node, _ in node.value:
        key = loader.construct_object(key_node, deep=deep)
        if key in seen:
            raise yaml.constructor.ConstructorError(
                None, None, f"key {key!r} is given twice in one mapping", key_node.start_mark)
        seen[key] = True
    return loader.construct_mapping(node, deep=deep)


Loader.add_constructor("tag:yaml.org,2002:int", _int)
Loader.add_constructor("tag:yaml.org,2002:float", _float)
Loader.add_constructor("tag:yaml.org,2002:bool", _bool)
Loader.add_constructor("tag:yaml.org,2002:map", _mapping)


def find_ambiguous(node: Any, path: str = "") -> tuple[str, Ambiguous] | None:
    """The first refused scalar in a loaded tree, with its dotted key."""
    if isinstance(node, Ambiguous):
        return path, node
    items = (node.items() if isinstance(node, dict)
             else enumerate(node) if isinstance(node, list) else ())
    for key, child in items:
        found = find_ambiguous(child, f"{path}.{key}" if path else str(key))
        if found:
            return found
    return None


def load(text: str) -> tuple[Any, str | None]:
    """(the loaded value, None), or (None, what is wrong: its dotted key and the problem).
    Raises yaml.YAMLError for text that is not YAML."""
    value = yaml.load(text, Loader=Loader)  # noqa: S506 - a SafeLoader subclass
    found = find_ambiguous(value)
    if found:
        where, scalar = found
        return None, f"{where}: {scalar.problem()}" if where else scalar.problem()
    return value, None


def one_line(error: yaml.YAMLError) -> str:
    """A YAML error as one line: the problem and where (line, column)."""
    problem = getattr(error, "problem", None) or str(error).splitlines()[0]
    mark = getattr(error, "problem_mark", None)
    where = f" (line {mark.line + 1}, column {mark.column + 1})" if mark else ""
    return f"{problem}{where}"
