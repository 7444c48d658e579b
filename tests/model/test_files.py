import os
import subprocess
import sys

import pytest

from beni_model.files import atomic_path, remove_leftovers


def test_a_file_appears_whole_or_not_at_all(tmp_path):
    target = tmp_path / "out.txt"
    target.write_text("old")
    with pytest.raises(RuntimeError):
        with atomic_path(target) as tmp:
            tmp.write_text("half")
            raise RuntimeError("killed")
    assert target.read_text() == "old" and os.listdir(tmp_path) == ["out.txt"]
    with atomic_path(target) as tmp:
        tmp.write_text("new")
    assert target.read_text() == "new" and os.listdir(tmp_path) == ["out.txt"]


def test_a_folder_replaces_a_full_folder(tmp_path):
    target = tmp_path / "model"
    target.mkdir()
    (target / "stale.bin").write_bytes(b"x")
    with atomic_path(target) as tmp:
        tmp.mkdir()
        (tmp / "weights.bin").write_bytes(b"y")
    assert sorted(os.listdir(target)) == ["weights.bin"] and os.listdir(tmp_path) == ["model"]


def test_two_writers_never_share_a_temp_name(tmp_path):
    with atomic_path(tmp_path / "a") as first, atomic_path(tmp_path / "a") as second:
        first.write_text("first")
        second.write_text("second")
        assert first != second
    assert (tmp_path / "a").read_text() == "first"  # the last to finish wins, whole


def test_a_killed_writer_leaves_the_old_file(tmp_path):
    target = tmp_path / "index.json"
    target.write_text("complete")
    code = f"""
import os
from beni_model.files import atomic_path, remove_leftovers
with atomic_path({str(target)!r}) as tmp:
    tmp.write_text("partial")
    os.kill(os.getpid(), 9)
"""
    assert subprocess.run([sys.executable, "-c", code]).returncode == -9
    assert target.read_text() == "complete"


def test_leftovers_of_killed_writers_are_removed(tmp_path):
    target = tmp_path / "corpus.jsonl"
    (tmp_path / ".corpus.jsonl.123.abcd1234.tmp").write_text("partial")
    (tmp_path / ".corpus.jsonl.123.abcd1234.tmp.old").mkdir()
    (tmp_path / ".other.jsonl.123.abcd1234.tmp").write_text("someone else's")
    remove_leftovers(target)
    assert os.listdir(tmp_path) == [".other.jsonl.123.abcd1234.tmp"]
