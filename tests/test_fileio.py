"""Atomic writes: the new content or the old, never a half-written file or a stray temporary."""
import os
import stat

import pytest

from diffrl_bench import fileio
from diffrl_bench.fileio import atomic_write


def test_writes_text_as_utf8_and_bytes_as_they_are(tmp_path):
    atomic_write(tmp_path / "a.txt", "naïve\n")
    atomic_write(tmp_path / "b.bin", b"\x00\xff")
    assert (tmp_path / "a.txt").read_bytes() == "naïve\n".encode("utf-8")
    assert (tmp_path / "b.bin").read_bytes() == b"\x00\xff"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.txt", "b.bin"]  # no temporary left behind


def test_replaces_an_existing_file(tmp_path):
    path = tmp_path / "DONE"
    path.write_text("old")
    assert atomic_write(str(path), "new") == path
    assert path.read_text() == "new" and [p.name for p in tmp_path.iterdir()] == ["DONE"]


def test_a_failed_write_keeps_the_old_content_and_removes_its_temporary(tmp_path, monkeypatch):
    path = tmp_path / "report.md"
    path.write_text("old")

    def crash(fd):
        raise OSError("disk full")

    monkeypatch.setattr(fileio.os, "fsync", crash)
    with pytest.raises(OSError, match="disk full"):
        atomic_write(path, "new")
    assert path.read_text() == "old" and [p.name for p in tmp_path.iterdir()] == ["report.md"]


def test_the_file_gets_the_umask_permissions_not_owner_only(tmp_path):
    old = os.umask(0o022)
    try:
        atomic_write(tmp_path / "summary.csv", "a,b\n")
    finally:
        os.umask(old)
    assert stat.S_IMODE((tmp_path / "summary.csv").stat().st_mode) == 0o644
