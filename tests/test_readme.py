"""The README's examples run as written: its Python example used a top-level ``await``,
which a script cannot."""

from __future__ import annotations

import re
import sys
from pathlib import Path

from tests.engine_helpers import run_process

README = Path(__file__).resolve().parent.parent / "README.md"


async def test_the_python_example_of_the_readme_runs(db, cli_env, tmp_path):
    [block] = re.findall(r"Submitting from Python:\n\n```python\n(.*?)^```", README.read_text(),
                         re.MULTILINE | re.DOTALL)
    script = tmp_path / "example.py"
    script.write_text(block)
    code, out, err = await run_process([sys.executable, str(script)], cli_env, tmp_path)
    assert code == 0, err
    assert out.startswith("Created(item=WorkItem(id=UUID(")
    [item] = await db.list_work(work_type="transform")
    assert (item.dedup_key, item.params) == ("task-123", {"content": "hello world"})
