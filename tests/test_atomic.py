"""Atomic writes replace regular files only: a device, a folder or a pipe named as the file to write
is refused in one line and left as it was; a link is followed, and stays a link."""

import os

import pytest

from captioner.atomic import write_text_atomic
from captioner.errors import CaptionerError


def test_a_write_replaces_a_regular_file_and_follows_a_link(tmp_path):
    target = tmp_path / "out.txt"
    write_text_atomic(target, "one")
    link = tmp_path / "link.txt"
    link.symlink_to(target)
    write_text_atomic(link, "two")
    assert link.is_symlink() and target.read_text() == "two"  # the link stays, pointing at the new file


def test_a_pipe_a_folder_or_a_link_to_one_is_refused_and_left_alone(tmp_path):
    pipe = tmp_path / "pipe"
    os.mkfifo(pipe)
    folder = tmp_path / "folder"
    folder.mkdir()
    link = tmp_path / "link"
    link.symlink_to(pipe)
    for path in (pipe, folder, link):
        with pytest.raises(CaptionerError, match=r"is not a regular file \(a device, a folder or a pipe\): a write would replace it"):
            write_text_atomic(path, "text")
    assert pipe.is_fifo() and folder.is_dir() and link.is_symlink() and link.resolve() == pipe
    assert sorted(p.name for p in tmp_path.iterdir()) == ["folder", "link", "pipe"]  # no temporary file left
