"""Atomic writes (lmschool/files.py): a directory or file is replaced whole, or left as it was."""

import pytest

from lmschool.files import atomic_dir, atomic_write_text


def test_atomic_dir_replaces_whole_or_leaves_alone(tmp_path):
    out = tmp_path / "d"
    with atomic_dir(out) as tmp:
        (tmp / "a.txt").write_text("one")
    assert [p.name for p in out.iterdir()] == ["a.txt"]
    with pytest.raises(RuntimeError):
        with atomic_dir(out) as tmp:
            (tmp / "b.txt").write_text("half")
            raise RuntimeError("crash while writing")
    assert [p.name for p in out.iterdir()] == ["a.txt"] and (out / "a.txt").read_text() == "one"
    with atomic_dir(out) as tmp:
        (tmp / "b.txt").write_text("two")
    assert [p.name for p in out.iterdir()] == ["b.txt"]
    assert [p.name for p in tmp_path.iterdir()] == ["d"]            # no temporary directory left
    assert oct(out.stat().st_mode & 0o777) == oct(0o755)


def test_atomic_write_text(tmp_path):
    atomic_write_text(tmp_path / "f.json", "{}\n")
    atomic_write_text(tmp_path / "f.json", "[]\n")
    assert (tmp_path / "f.json").read_text() == "[]\n" and [p.name for p in tmp_path.iterdir()] == ["f.json"]


def test_files_imports_no_torch():
    import subprocess
    import sys
    code = "import sys, lmschool.files, lmschool.world.build; assert 'torch' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True)
