"""clrlab.files: atomic writes that survive a kill or a full disk, planted symlinks, one-line JSON errors."""

from __future__ import annotations

import errno
import json
import os
import threading

import pytest

from clrlab import files
from clrlab.errors import UserError


def test_a_write_that_never_reaches_the_rename_leaves_the_old_file(tmp_path, monkeypatch):
    # SIGKILL before os.replace: the destination must still hold the previous, complete file.
    path = tmp_path / "run_config.json"
    files.write_json(path, {"seed": 0})

    def killed(*args, **kwargs):
        raise KeyboardInterrupt("killed before the rename")

    monkeypatch.setattr(os, "replace", killed)
    with pytest.raises(KeyboardInterrupt):
        files.write_json(path, {"seed": 1})
    assert json.loads(path.read_text()) == {"seed": 0}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run_config.json"]  # no temp file left behind


def test_enospc_mid_write_leaves_the_old_file_and_no_temp(tmp_path, monkeypatch):
    path = tmp_path / "run_config.json"
    files.write_atomic(path, "old content")
    real_fsync = os.fsync
    calls = []

    def full_disk(fd):
        calls.append(fd)
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "fsync", full_disk)
    with pytest.raises(UserError) as info:
        files.write_atomic(path, "new content " * 1000)
    monkeypatch.setattr(os, "fsync", real_fsync)
    assert str(info.value).startswith(f"cannot write {path}: No space left on device; free some disk space, then rerun")
    assert info.value.__cause__.errno == errno.ENOSPC and calls
    assert path.read_text() == "old content"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run_config.json"]


def test_a_planted_symlink_is_replaced_and_its_target_untouched(tmp_path):
    target = tmp_path / "precious.txt"
    target.write_text("keep me")
    for name in ("flags.txt", "run_config.json"):
        link = tmp_path / name
        link.symlink_to(target)
        files.write_atomic(link, "written")
        assert not link.is_symlink() and link.read_text() == "written"
    assert target.read_text() == "keep me"


def test_written_files_get_the_usual_permissions(tmp_path):
    files.write_atomic(tmp_path / "a.txt", b"bytes")
    mode = os.stat(tmp_path / "a.txt").st_mode & 0o777
    assert mode == 0o666 & ~files._UMASK and (tmp_path / "a.txt").read_bytes() == b"bytes"


@pytest.mark.parametrize("content", [b"", b"   \n", b'{"seed": 0, "sch', b"\xff\xfe garbage"])
def test_a_damaged_json_file_is_one_line_naming_the_path_and_the_fix(tmp_path, content):
    path = tmp_path / "run_config.json"
    path.write_bytes(content)
    with pytest.raises(UserError) as info:
        files.read_json(path, "the run's settings", fix="delete it and rerun")
    message = str(info.value)
    assert "\n" not in message and str(path) in message and "is damaged" in message
    assert message.endswith("; delete it and rerun.")
    assert info.value.__cause__ is None and info.value.__suppress_context__


def test_read_json_rebuild_and_missing(tmp_path):
    path = tmp_path / "history.json"
    assert files.read_json(path, "history") is None
    with pytest.raises(UserError, match="does not exist"):
        files.read_json(path, "history", missing_ok=False)
    path.write_text("{trunc")
    assert files.read_json(path, "history", rebuild=True) is None
    path.write_text('{"a": [1, 2]}')
    assert files.read_json(path, "history") == {"a": [1, 2]}


def test_make_unique_dir_gives_concurrent_callers_distinct_folders(tmp_path):
    base = str(tmp_path / "runs" / "triangular-small_cnn-20260101-000000")
    made, barrier = [], threading.Barrier(6)

    def claim():
        barrier.wait()
        made.append(files.make_unique_dir(base))

    threads = [threading.Thread(target=claim) for _ in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(made) == sorted([base] + [f"{base}-{n}" for n in range(2, 7)])
    assert all(os.path.isdir(p) for p in made)


def test_a_folder_in_the_way_is_one_line_naming_the_path(tmp_path):
    (tmp_path / "flags.txt").mkdir()
    with pytest.raises(UserError, match=r"cannot write .*flags.txt: Is a directory; "
                                        r"a folder stands where a file is written: "
                                        r"remove or rename it"):
        files.write_atomic(tmp_path / "flags.txt", "x")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["flags.txt"]


def test_a_read_only_folder_says_fix_the_permissions(tmp_path, monkeypatch):
    def refused(*args, **kwargs):
        raise PermissionError(errno.EACCES, "Permission denied")

    monkeypatch.setattr(files.tempfile, "mkstemp", refused)
    with pytest.raises(UserError, match=r"Permission denied; fix the folder's permissions, then rerun"):
        files.write_atomic(tmp_path / "flags.txt", "x")


def test_replace_file_leaves_the_wording_to_the_caller_and_the_old_file_in_place(tmp_path, monkeypatch):
    path = tmp_path / "history.json"
    files.replace_file(path, "old")
    monkeypatch.setattr(os, "fsync", lambda fd: (_ for _ in ()).throw(OSError(errno.ENOSPC, "No space left")))
    with pytest.raises(OSError) as info:
        files.replace_file(path, b"new")
    assert info.value.errno == errno.ENOSPC and not isinstance(info.value, UserError)
    assert path.read_text() == "old" and sorted(p.name for p in tmp_path.iterdir()) == ["history.json"]
    assert files.os_error_advice(info.value) == "free some disk space"
    assert files.os_error_advice(OSError(errno.EIO, "I/O"), "check the disk") == "check the disk"
