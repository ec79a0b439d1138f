#!/usr/bin/env python3
"""List every refusal of the package (``raise ConfigError(...)`` and friends) for docs/errors.md.

    python tools/error_catalogue.py           # rewrite the generated part of docs/errors.md
    python tools/error_catalogue.py --check   # exit 1 if it is out of date (the test suite runs this)

Each ``raise <ProjectError>(message)`` in ``megatron_ift/`` becomes one line: the module, the
class and the message template (``{...}`` are the values filled in at run time).
"""

from __future__ import annotations

import ast
import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DOC = os.path.join(ROOT, "docs", "errors.md")
BEGIN = "<!-- BEGIN GENERATED: python tools/error_catalogue.py -->"
END = "<!-- END GENERATED -->"
CLASSES = {
    "ConfigError": "ConfigError", "FP8UnsupportedError": "ConfigError", "DataError": "DataError",
    "CheckpointError": "CheckpointError", "ConversionError": "ConversionError",
    "TrainingDiverged": "TrainingDiverged", "RankLost": "RankLost", "StorageError": "StorageError",
}


def _template(node: ast.AST) -> str:
    """The message of ``node`` with run-time values as ``{expression}``."""
    if isinstance(node, ast.Constant) and isinstance(node.value, str):
        return node.value
    if isinstance(node, ast.JoinedStr):
        return "".join(
            v.value if isinstance(v, ast.Constant) else "{" + ast.unparse(v.value) + "}"
            for v in node.values
        )
    if isinstance(node, ast.BinOp) and isinstance(node.op, ast.Add):
        return _template(node.left) + _template(node.right)
    return "{" + ast.unparse(node) + "}"


def entries() -> list[tuple[str, str, str]]:
    """(module, error class, message template) of every raise site, in file order."""
    out = []
    pkg = os.path.join(ROOT, "megatron_ift")
    for dirpath, _, files in sorted(os.walk(pkg)):
        for name in sorted(files):
            if not name.endswith(".py"):
                continue
            path = os.path.join(dirpath, name)
            module = os.path.relpath(path, ROOT)[:-3].replace(os.sep, ".")
            tree = ast.parse(open(path, encoding="utf-8").read(), path)
            for node in ast.walk(tree):
                if not (isinstance(node, ast.Raise) and isinstance(node.exc, ast.Call)):
                    continue
                func = node.exc.func
                cls = func.id if isinstance(func, ast.Name) else getattr(func, "attr", "")
                if cls in CLASSES and node.exc.args:
                    text = " ".join(_template(node.exc.args[0]).split())
                    out.append((node.lineno, module, CLASSES[cls], text))
    out.sort(key=lambda e: (e[1], e[0]))
    return [(m, c, t) for _, m, c, t in out]


def render() -> str:
    lines = [BEGIN, "", "| module | error | message |", "|---|---|---|"]
    for module, cls, text in entries():
        text = text.replace("|", "\\|")
        lines.append(f"| `{module}` | {cls} | {text} |")
    lines += ["", END]
    return "\n".join(lines)


def main(argv: list[str]) -> int:
    doc = open(DOC, encoding="utf-8").read()
    if BEGIN not in doc or END not in doc:
        print(f"{DOC} lacks the {BEGIN} ... {END} markers", file=sys.stderr)
        return 1
    head, rest = doc.split(BEGIN, 1)
    new = head + render() + rest.split(END, 1)[1]
    if "--check" in argv:
        if new != doc:
            print(f"{DOC} is out of date: run python tools/error_catalogue.py", file=sys.stderr)
            return 1
        return 0
    with open(DOC, "w", encoding="utf-8") as f:
        f.write(new)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
