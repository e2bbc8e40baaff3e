"""Count non-blank, non-comment lines of Python per package folder (the README's figure).

    python scripts/count_lines.py                  # prints a table
    python scripts/count_lines.py --update-readme  # also writes the total into README.md
"""
import pathlib
import re
import sys

root = pathlib.Path(__file__).resolve().parent.parent / "functional_llm"


def code_lines(path: pathlib.Path) -> int:
    n, in_doc = 0, False
    for line in path.read_text().splitlines():
        s = line.strip()
        if in_doc:
            in_doc = not (s.endswith('"""') or s.endswith("'''"))
            continue
        if re.match(r'^[rbu]?("""|\'\'\')', s):
            body = s[3:]
            in_doc = not (body.endswith('"""') or body.endswith("'''")) or len(s) == 3
            continue
        if s and not s.startswith("#"):
            n += 1
    return n


def main() -> int:
    per_folder = {}
    for f in sorted(f for f in root.rglob("*.py") if "serve" not in f.relative_to(root).parts[:1]):
        rel = f.relative_to(root)
        key = rel.parts[0] if len(rel.parts) > 1 else "(top)"
        per_folder[key] = per_folder.get(key, 0) + code_lines(f)
    for k, v in per_folder.items():
        print(f"{k:10s} {v:5d}")
    total = sum(per_folder.values())
    print(f"{'total':10s} {total:5d}  (code lines, docstrings and comments excluded)")
    if "--update-readme" in sys.argv:
        readme = root.parent / "README.md"
        text = re.sub(r"\*\*(\d+|LINES_FIGURE)\*\* lines", f"**{total}** lines", readme.read_text())
        readme.write_text(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
