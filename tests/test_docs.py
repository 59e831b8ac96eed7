"""Every Python block in README.md and docs/ runs as written, each in a fresh interpreter."""

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]


def python_blocks():
    for path in DOCS:
        for i, block in enumerate(re.findall(r"```python\n(.*?)```", path.read_text(), flags=re.S)):
            yield pytest.param(block, id=f"{path.relative_to(ROOT)}-{i}")


@pytest.mark.slow
@pytest.mark.parametrize("block", list(python_blocks()))
def test_python_block_runs_as_written(block, tmp_path):
    r = subprocess.run([sys.executable, "-c", block], cwd=tmp_path, capture_output=True, text=True, timeout=600,
                       env={**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")})
    assert r.returncode == 0, r.stderr[-3000:]


def test_the_readme_stays_short_and_its_links_resolve():
    text = (ROOT / "README.md").read_text()
    assert len(text.encode()) <= 12 * 1024
    for path in DOCS:
        for target in re.findall(r"\]\(((?:docs/)?[\w./-]+\.md)\)", path.read_text()):
            assert (path.parent / target).is_file(), f"{path.name} links to a missing {target}"
