"""clipforge.atomic: the one whole-file write of the package."""

from __future__ import annotations

import os

import pytest

from clipforge.atomic import AtomicWriteError, atomic_path, write_atomic, write_bytes_atomic


def test_a_failed_write_keeps_the_old_file_and_leaves_no_temp(tmp_path):
    target = tmp_path / "f.json"
    target.write_bytes(b"old")

    def dies_half_way(f):
        f.write(b"ne")
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        write_atomic(target, dies_half_way)
    assert target.read_bytes() == b"old" and os.listdir(tmp_path) == ["f.json"]


def test_an_os_error_is_named_and_typed_as_asked(tmp_path):
    class Mine(ValueError):
        pass

    missing = tmp_path / "no" / "such" / "folder" / "f"
    with pytest.raises(AtomicWriteError, match="cannot write .*f"):
        write_bytes_atomic(missing, b"x")
    with pytest.raises(Mine, match="cannot write"):
        write_atomic(missing, lambda f: f.write(b"x"), error=Mine)


def test_temp_names_are_unique_per_write(tmp_path):
    # Two writers of one target (two server processes, one thumbnail) must not share a temp file.
    target = tmp_path / "t.jpg"
    with atomic_path(target, durable=False) as a, atomic_path(target, durable=False) as b:
        assert a != b and a.name.endswith("t.jpg.tmp") and a.parent == tmp_path
        a.write_bytes(b"a")
        b.write_bytes(b"b")
    assert target.read_bytes() == b"a" and os.listdir(tmp_path) == ["t.jpg"]
