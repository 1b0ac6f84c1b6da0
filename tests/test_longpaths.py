"""Splitting of paths longer than PATH_MAX, without a helper process."""

from __future__ import annotations

import pytest

from virtfs_proxy_helper.longpaths import PATH_MAX, _chunks, _split_last


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
    assert _split_last(path) == (directory, name)


def test_chunks_stay_below_path_max() -> None:
    directory = b"/" + b"/".join([b"x" * 250] * 60)
    chunks = list(_chunks(directory))
    assert len(chunks) > 1
    assert all(len(chunk) < PATH_MAX for chunk in chunks)
    assert b"".join(chunks).rstrip(b"/") == directory


def test_chunks_keep_root_and_dotdot() -> None:
    assert list(_chunks(b"/a/../b")) == [b"/a/../b/"]
    assert list(_chunks(b"a//b")) == [b"a/b/"]
