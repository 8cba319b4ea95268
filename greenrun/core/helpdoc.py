"""Every config key with its default and its one-line comment, read from greenrun's own source.

`greenrun train --help` must answer in well under a second, and importing the config schema pulls in torch
(seconds on a small machine). The dataclass source is the documentation anyway: each field is declared on one
line, `name: type = maths(default)  # what it means, with units`, so reading the files is enough.
"""

from __future__ import annotations

import ast
import re
from dataclasses import dataclass
from pathlib import Path

import greenrun

_COMMENT = re.compile(r"#\s*(.*)$")


@dataclass(frozen=True)
class Key:
    name: str  # dotted, e.g. optimizer.lr
    default: str  # as written in the source, e.g. 0.002
    doc: str  # the field's trailing comment


def _default(node: ast.expr | None) -> tuple[str | None, str]:
    """(nested dataclass name, default as text) of a field's right-hand side."""
    if node is None:
        return None, "???"
    if isinstance(node, ast.Call) and isinstance(node.func, ast.Name):
        kwargs = {k.arg: k.value for k in node.keywords}
        factory = kwargs.get("default_factory", kwargs.get("factory"))
        if isinstance(factory, ast.Name):
            if factory.id in ("list", "dict"):
                return None, "[]" if factory.id == "list" else "{}"
            return factory.id, ""
        value = node.args[0] if node.args else kwargs.get("default")
        return None, _literal(value)
    return None, _literal(node)


def _literal(node: ast.expr | None) -> str:
    if node is None:
        return "???"
    try:
        return str(ast.literal_eval(node))
    except ValueError:
        return ast.unparse(node)


def _dataclasses() -> dict[str, list[tuple[str, str | None, str, str]]]:
    """class name -> [(field, nested class or None, default text, comment)] for every class in greenrun/."""
    found: dict[str, list[tuple[str, str | None, str, str]]] = {}
    for path in sorted(Path(greenrun.__file__).resolve().parent.rglob("*.py")):
        source = path.read_text()
        lines = source.splitlines()
        for node in ast.walk(ast.parse(source)):
            if not isinstance(node, ast.ClassDef):
                continue
            rows = []
            for item in node.body:
                if isinstance(item, ast.AnnAssign) and isinstance(item.target, ast.Name):
                    nested, default = _default(item.value)
                    comment = _COMMENT.search(lines[item.end_lineno - 1])
                    rows.append((item.target.id, nested, default, comment.group(1) if comment else ""))
            if rows:
                found.setdefault(node.name, rows)
    return found


def config_keys(root: str = "Config") -> list[Key]:
    """The leaves of the root config, in declaration order."""
    classes = _dataclasses()
    keys: list[Key] = []

    def walk(name: str, prefix: str) -> None:
        for field, nested, default, doc in classes[name]:
            if nested is not None and nested in classes:
                walk(nested, f"{prefix}{field}.")
            else:
                keys.append(Key(prefix + field, default, doc))

    walk(root, "")
    return keys
