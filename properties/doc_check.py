"""docs/transitions.md <-> test names. The naming convention: a test that checks invariant I4
carries `_I4_` in its function name (test_I4_I9_pool_machine_with_weak_hash). The doc's
invariant table lists, per invariant, the tests that check it as `test_name`s.

Problems reported: an invariant in the doc with no test; a listed test that does not exist
or whose name lacks that invariant; a test whose name carries an invariant the doc lacks,
or that the doc does not list under it.

    python -m properties.doc_check        # prints the problems, exit code 1 if any
"""
from __future__ import annotations

import ast
import pathlib
import re
import sys

ROOT = pathlib.Path(__file__).resolve().parent.parent
DOC = ROOT / "docs" / "transitions.md"
TEST_DIRS = ("tests", "properties")
_ROW = re.compile(r"^\|\s*(I\d+)\s*\|(.*)\|\s*$")     # | I4 | statement ... | `test_x` |
_LISTED = re.compile(r"`(test_\w+)`")
_TAG = re.compile(r"(?<=_)I\d+(?=_)")


def doc_invariants(text: str) -> dict[str, set]:
    """Invariant -> the test names its table row lists."""
    out: dict[str, set] = {}
    for line in text.splitlines():
        m = _ROW.match(line)
        if m:
            out.setdefault(m[1], set()).update(_LISTED.findall(m[2]))
    return out


def tagged_tests(sources: dict[str, str]) -> dict[str, set]:
    """Test function name -> the invariants its name carries, over {path: source}."""
    out: dict[str, set] = {}
    for path, source in sources.items():
        for node in ast.walk(ast.parse(source, path)):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and node.name.startswith("test_"):
                tags = set(_TAG.findall(node.name + "_"))
                if tags:
                    out[node.name] = tags
    return out


def problems(doc: dict[str, set], tests: dict[str, set]) -> list[str]:
    found = []
    for inv, names in sorted(doc.items()):
        if not names:
            found.append(f"{inv}: the doc names no test for it")
        for name in sorted(names):
            if name not in tests:
                found.append(f"{inv}: the doc lists `{name}`, which is no test named after an invariant")
            elif inv not in tests[name]:
                found.append(f"{inv}: the doc lists `{name}`, whose name does not carry {inv}")
    for name, tags in sorted(tests.items()):
        for inv in sorted(tags):
            if inv not in doc:
                found.append(f"`{name}` names {inv}, which the doc does not define")
            elif name not in doc[inv]:
                found.append(f"`{name}` names {inv}, but the doc does not list it under {inv}")
    return found


def check(root: pathlib.Path = ROOT) -> list[str]:
    sources = {str(p): p.read_text() for d in TEST_DIRS for p in sorted((root / d).rglob("test_*.py"))}
    return problems(doc_invariants((root / "docs" / "transitions.md").read_text()), tagged_tests(sources))


def main() -> int:
    found = check()
    for line in found:
        print(line)
    print(f"docs/transitions.md: {len(found)} problem(s)" if found else "docs/transitions.md: tests and doc agree")
    return 1 if found else 0


if __name__ == "__main__":
    sys.exit(main())
