import subprocess
import sys

import pytest


@pytest.mark.slow
def test_core_imports_without_nni_or_gpu_only_packages():
    code = ("import sys, nni_2ndmatch, nni_2ndmatch.training, nni_2ndmatch.cli; "
            "bad = [m for m in ('nni', 'tensorrt', 'torch_pruning') if m in sys.modules]; "
            "assert not bad, bad; print('ok')")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert r.returncode == 0 and r.stdout.strip() == "ok", r.stderr
