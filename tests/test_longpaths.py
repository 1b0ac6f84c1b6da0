"""Splitting of paths longer than PATH_MAX, without a helper process."""

from __future__ import annotations

import pytest

from virtfs_proxy_helper.longpaths import PATH_MAX, chunks, split_last


@pytest.mark.parametrize(
    ("path", "directory", "name"),
    [
        (b"/a/b/c", b"/a/b", b"c"),
        (b"//a//b", b"//a/", b"b"),
        (b"/a/b/", b"/a", b"b/"),
        (b"/a", b"/", b"a"),
        (b"a", b"", b"a"),
    ],
)
def test_split_last_name(path: bytes, directory: bytes, name: bytes) -> None:
    assert split_last(path) == (directory, name)


def test_chunks_stay_below_path_max() -> None:
    directory = b"/" + b"/".join([b"x" * 250] * 60)
    pieces = list(chunks(directory))
    assert len(pieces) > 1
    assert all(len(piece) < PATH_MAX for piece in pieces)
    assert b"".join(pieces).rstrip(b"/") == directory


def test_chunks_keep_root_and_dotdot() -> None:
    assert list(chunks(b"/a/../b")) == [b"/a/../b/"]
    assert list(chunks(b"a//b")) == [b"a/b/"]
