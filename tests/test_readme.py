"""The README's notebook snippet runs as written."""

import pathlib
import re

README = pathlib.Path(__file__).resolve().parent.parent / "README.md"


def test_notebook_snippet_runs(capsys):
  text = README.read_text()
  block = re.search(r"<!-- notebook-snippet:start -->\s*```python\n(.*?)```", text, re.S)
  assert block, "README has no notebook snippet"
  namespace: dict = {}
  exec(compile(block.group(1), "README.md", "exec"), namespace)
  parts = namespace["parts"]
  assert float(parts.ce) > 0 and float(parts.mse) > 0
  assert "[0 1 2 3 4 5 5 5 5 5 5 0]" in capsys.readouterr().out
