"""The README's Python examples run as written (they use the embedded MiniLM)."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

README = Path(__file__).resolve().parents[1] / "README.md"


@pytest.mark.slow
def test_readme_python_blocks_run() -> None:
    blocks = re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S)
    assert blocks, "the README shows how to use the library"
    namespace: dict = {}
    for block in blocks:
        exec(compile(block, str(README), "exec"), namespace)
    assert str(namespace["report"]).startswith("wrapped 12 linear layers")
    assert sorted(namespace["model"].freeze_base()) == sorted(
        [f"base.{n}.core.weight" for n in namespace["names"]] + ["head.weight", "head.bias"]
    )
