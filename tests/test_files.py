"""Atomic writes (lmschool/files.py): a directory or file is replaced whole, or left as it was;
--force replaces only what lmschool wrote; a kill mid-replacement is mended at the next start."""

import os
import shutil

import pytest

from lmschool.errors import UserError
from lmschool.files import (RUN_MARKER, atomic_dir, atomic_write_text, check_replaceable, clean_leftovers, recover,
                            staging_dir, swap_in)


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


# ---- --force replaces only what lmschool wrote; a kill mid-replacement is mended ----------------

def make(path, *names):
    path.mkdir(parents=True, exist_ok=True)
    for name in names:
        (path / name).mkdir() if "." not in name.lstrip(".") else (path / name).write_text("x")
    return path


def test_check_replaceable(tmp_path):
    check_replaceable(make(tmp_path / "run", "config.yaml", "metrics.jsonl", "model", ".x.tmp-3"), "run")
    check_replaceable(make(tmp_path / "new", RUN_MARKER), "run")
    check_replaceable(make(tmp_path / "w", "world.json", "corpus.txt"), "world")
    with pytest.raises(UserError, match=r"holds thesis.tex, which lmschool did not write; --force replaces only"):
        check_replaceable(make(tmp_path / "mixed", "config.yaml", "model", "thesis.tex"), "run")
    with pytest.raises(UserError, match=r"holds a.txt, b.txt, c.txt and 1 more"):
        check_replaceable(make(tmp_path / "many", "a.txt", "b.txt", "c.txt", "d.txt"), "run")
    with pytest.raises(UserError, match=r"is not an lmschool run directory \(it has no .lmschool-run\)"):
        check_replaceable(make(tmp_path / "generic", "model"), "run")     # only a name lmschool also uses
    with pytest.raises(UserError, match="is not an lmschool tokenizer directory"):
        check_replaceable(make(tmp_path / "t", "tokenizer_config.json"), "tokenizer")


def test_swap_in_and_recover_every_kill_point(tmp_path):
    """swap_in is two renames and a removal; whichever instant a kill lands, recover leaves the
    old directory or the finished new one, and nothing beside it."""
    def fresh():
        for p in tmp_path.iterdir():
            shutil.rmtree(p)
        out = make(tmp_path / "run", "old.txt")
        new = make(staging_dir(out), "new.txt")
        return out, new, tmp_path / ".run.replaced"

    out, new, aside = fresh()           # killed before the first rename: the old run stays
    assert "removed the unfinished replacement" in recover(out)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run"] and (out / "old.txt").is_file()
    out, new, aside = fresh()           # killed between the renames: the new run goes in
    os.replace(out, aside)
    assert "finished replacing" in recover(out)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run"] and (out / "new.txt").is_file()
    out, new, aside = fresh()           # killed before removing the old one: it goes
    os.replace(out, aside), os.replace(new, out)
    recover(out)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run"] and (out / "new.txt").is_file()
    out, new, aside = fresh()           # not killed
    swap_in(new, out)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run"] and (out / "new.txt").is_file()
    assert recover(out) is None


def test_clean_leftovers_touches_only_this_output(tmp_path):
    out = make(tmp_path / "run", RUN_MARKER, "config.yaml", ".summary.json.tmp-12")
    make(out / "checkpoints", "step-00000010", ".step-00000020.tmp-abc")
    make(tmp_path, ".run.tmp-xyz", ".other.tmp-1", ".bashrc", "notes.tmp-1")
    notes = clean_leftovers(out, inside=("checkpoints",))
    assert len(notes) == 3
    assert sorted(p.name for p in tmp_path.iterdir()) == [".bashrc", ".other.tmp-1", "notes.tmp-1", "run"]
    assert sorted(p.name for p in out.iterdir()) == [RUN_MARKER, "checkpoints", "config.yaml"]
    assert [p.name for p in (out / "checkpoints").iterdir()] == ["step-00000010"]
    user = make(tmp_path / "mine", ".draft.tmp-1")   # not an lmschool run: nothing inside is touched
    assert clean_leftovers(user) == [] and (user / ".draft.tmp-1").exists()


def test_check_writable_names_a_file_in_the_way(tmp_path):
    """`--out afile/out` where afile is a file: the walk up to an existing parent stopped at the
    file, os.access said yes, and `tokenizer train` ended in a FileExistsError after training
    (bad-input matrix, issue 19)."""
    from lmschool.files import check_output_file, check_writable

    (tmp_path / "afile").write_text("a user's file\n")
    for path in (tmp_path / "afile" / "out", tmp_path / "afile" / "a" / "b"):
        with pytest.raises(UserError, match="afile is a file, not a directory; choose another --out"):
            check_writable(path)
    with pytest.raises(UserError, match="afile is a file, not a directory; choose another --answers"):
        check_output_file(tmp_path / "afile" / "x.jsonl", force=False, flag="--answers")
    check_writable(tmp_path / "new" / "dir")
    check_writable(tmp_path)
    check_writable(tmp_path / "afile")                             # an existing file may be replaced
    check_output_file(tmp_path / "afile", force=True)
