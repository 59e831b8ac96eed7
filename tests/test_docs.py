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


def test_the_config_in_docs_cli_names_every_field_and_finetuner_option():
    """docs/cli.md's config (its lines and the commented ones) is where a user looks up a key: each
    field of each section, and each option of each finetuner, is there."""
    from pydantic import BaseModel

    from nni_2ndmatch.config import Config
    from nni_2ndmatch.finetuners import available_finetuners, finetuner_class

    block = re.search(r"```yaml\n(.*?)```", (ROOT / "docs" / "cli.md").read_text(), flags=re.S).group(1)
    named = set(re.findall(r"(\w+):", block))

    def fields(model):
        for name, field in model.model_fields.items():
            yield name
            for kind in (field.annotation, *getattr(field.annotation, "__args__", ())):
                if isinstance(kind, type) and issubclass(kind, BaseModel):
                    yield from fields(kind)

    options = {key for name in available_finetuners() for key in finetuner_class(name).Options.model_fields}
    wanted = set(fields(Config)) | options
    assert not wanted - named, f"docs/cli.md's config lacks {sorted(wanted - named)}"
