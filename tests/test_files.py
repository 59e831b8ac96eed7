"""Atomic writes: the whole file or the old one, never a part; ordinary permissions."""

import os
import stat

import pytest
import torch

from nni_2ndmatch.files import atomic_dir, atomic_write_bytes, load_tensors, save_tensors


def test_a_failed_write_leaves_the_old_file_and_no_temporary(tmp_path, monkeypatch):
    target = tmp_path / "f.bin"
    atomic_write_bytes(target, b"old")

    def full_disk(fd):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "fsync", full_disk)
    with pytest.raises(OSError, match="No space left"):
        atomic_write_bytes(target, b"new" * 1000)
    assert target.read_bytes() == b"old" and os.listdir(tmp_path) == ["f.bin"]


def test_a_failed_folder_leaves_the_old_folder(tmp_path):
    with atomic_dir(tmp_path / "d") as d:
        (d / "a").write_text("1")
    with pytest.raises(RuntimeError), atomic_dir(tmp_path / "d") as d:
        (d / "a").write_text("2")
        raise RuntimeError("crash while writing")
    assert (tmp_path / "d" / "a").read_text() == "1" and sorted(os.listdir(tmp_path)) == ["d"]


def test_files_and_folders_get_the_permissions_of_the_umask(tmp_path):
    old = os.umask(0o022)
    try:
        atomic_write_bytes(tmp_path / "f", b"x")
        with atomic_dir(tmp_path / "d") as d:
            save_tensors(d / "w.safetensors", {})
        save_tensors(tmp_path / "t.safetensors", {"a": torch.zeros(2)})  # safetensors writes a file of its own
    finally:
        os.umask(old)
    assert stat.S_IMODE((tmp_path / "f").stat().st_mode) == 0o644
    assert stat.S_IMODE((tmp_path / "t.safetensors").stat().st_mode) == 0o644
    assert stat.S_IMODE((tmp_path / "d" / "w.safetensors").stat().st_mode) == 0o644
    assert stat.S_IMODE((tmp_path / "d").stat().st_mode) == 0o755
    assert load_tensors(tmp_path / "d" / "w.safetensors") == {}
