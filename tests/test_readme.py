"""The README's Python API block imports what it says."""

from __future__ import annotations

import re
from pathlib import Path


def test_readme_python_imports_resolve() -> None:
    text = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    block = re.search(r"```python\n(.*?)```", text, re.S)
    assert block is not None, "README has no python block"
    imports = [line for line in block.group(1).splitlines()
               if line.startswith(("import ", "from "))]
    assert len(imports) >= 4
    exec("\n".join(imports), {})  # raises ImportError for a name the package does not export
