"""Every settings field's text sits right under the field it describes.

The config files (scripts/gen-config) and `edgevoice config explain` take a field's
documentation from the string that follows it in the class body; a second string in a
row is silently dropped, and a string under the wrong field documents the wrong key.
"""

from __future__ import annotations

import ast
from pathlib import Path

import edgevoice

PACKAGE = Path(edgevoice.__file__).parent


def _stray_strings(tree: ast.Module) -> list[str]:
    found: list[str] = []
    for node in ast.walk(tree):
        if not isinstance(node, ast.ClassDef):
            continue
        body = node.body
        for i, statement in enumerate(body):
            is_string = (isinstance(statement, ast.Expr)
                         and isinstance(statement.value, ast.Constant)
                         and isinstance(statement.value.value, str))
            if not is_string or i == 0:
                continue  # the class docstring
            if not isinstance(body[i - 1], (ast.AnnAssign, ast.Assign)):
                found.append(f"{node.name} line {statement.lineno}")
    return found


def test_no_field_text_is_stranded_after_another() -> None:
    stray = {str(path.relative_to(PACKAGE)): found
             for path in sorted(PACKAGE.rglob("*.py"))
             if (found := _stray_strings(ast.parse(path.read_text(), str(path))))}
    assert stray == {}


def test_the_check_finds_a_stranded_text() -> None:
    source = 'class A:\n    """doc"""\n    x: int = 1\n    """x"""\n    """lost"""\n'
    assert _stray_strings(ast.parse(source)) == ["A line 5"]
