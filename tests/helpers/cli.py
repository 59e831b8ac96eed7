"""Running the command line as a user would: in a subprocess (``cli``) or in this process (``cli_here``)."""

import contextlib
import io
import os
import subprocess
import sys
from pathlib import Path

import yaml

from benchmarks.arms import VARIANT

ROOT = Path(__file__).resolve().parents[2]


def cli(*args, cwd=None, env=None):
    return subprocess.run([sys.executable, "-m", "nni_2ndmatch.cli", *map(str, args)], capture_output=True,
                          text=True, cwd=cwd, timeout=600, env=None if env is None else {**os.environ, **env})


def cli_here(*args):
    """``nni-2ndmatch ARGS`` in this process (no interpreter start-up): exit code and output, as ``cli``
    gives them."""
    from nni_2ndmatch.cli import main

    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = main([str(a) for a in args])
    return subprocess.CompletedProcess(args, code, out.getvalue(), err.getvalue())


#: 2ndmatch as the examples name it (they use kd, the equal-compute verdict): the measured variant
SECOND_MATCH = {"finetuner": "2ndmatch", "mode": "vjp", **VARIANT}


def write_config(tmp_path, edit=None, name="cfg.yaml"):
    """examples/tiny_finetune.yaml with 2ndmatch (the measured variant) for 3 steps into
    ``tmp_path``/run, after ``edit(raw)``."""
    raw = yaml.safe_load((ROOT / "examples" / "tiny_finetune.yaml").read_text())
    raw["finetune"].update(SECOND_MATCH, steps=3, checkpoint_every=2, batch_size=4)
    raw["output_dir"] = str(tmp_path / "run")
    if edit:
        edit(raw)
    path = tmp_path / name
    path.write_text(yaml.safe_dump(raw))
    return path


def assert_refused(raw, tmp_path, expected):
    """``nni-2ndmatch run`` of the config ``raw`` exits 2 with one message matching ``expected``,
    no traceback, and writes no run folder."""
    import re

    (tmp_path / "cfg.yaml").write_text(yaml.safe_dump(raw))
    r = cli_here("run", tmp_path / "cfg.yaml")
    assert r.returncode == 2 and re.search(expected, r.stderr), r.stderr
    assert "Traceback" not in r.stderr and not Path(raw["output_dir"]).exists()
