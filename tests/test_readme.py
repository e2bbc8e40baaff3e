"""Every ```python block of README.md runs as written, with the embedded model, in one namespace
in document order (a later block may use what an earlier one defined). A block whose previous
non-blank line is `<!-- not run: reason -->` is skipped (tensor parallelism, GPUs)."""
import pathlib
import re

import pytest

pytestmark = pytest.mark.slow

README = pathlib.Path(__file__).resolve().parent.parent / "README.md"
FENCE = re.compile(r"^```python\n(.*?)^```", re.S | re.M)
NOT_RUN = re.compile(r"<!--\s*not run:\s*(.+?)\s*-->\s*$")


def python_blocks(text: str) -> list:
    """[(line number, code, reason not to run or None)] for each ```python block."""
    blocks = []
    for m in FENCE.finditer(text):
        before = [line for line in text[:m.start()].splitlines() if line.strip()]
        skip = NOT_RUN.search(before[-1]) if before else None
        blocks.append((text[:m.start()].count("\n") + 1, m.group(1), skip and skip.group(1)))
    return blocks


BLOCKS = python_blocks(README.read_text())
NAMESPACE: dict = {"__name__": "readme"}     # shared: blocks build on each other


def test_the_readme_has_python_blocks_and_the_parser_sees_markers():
    assert BLOCKS and any(reason is None for *_, reason in BLOCKS)
    sample = "text\n<!-- not run: needs two GPUs -->\n```python\nx = 1\n```\n\n```python\ny = 2\n```\n"
    assert [(code, reason) for _, code, reason in python_blocks(sample)] == \
        [("x = 1\n", "needs two GPUs"), ("y = 2\n", None)]


@pytest.mark.parametrize("line,code,reason", BLOCKS, ids=[f"README.md:{b[0]}" for b in BLOCKS])
def test_readme_block_runs(line, code, reason):
    if reason:
        pytest.skip(f"marked not run: {reason}")
    exec(compile(code, f"README.md:{line}", "exec"), NAMESPACE)
