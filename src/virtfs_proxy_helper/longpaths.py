"""Requests on paths longer than the kernel's PATH_MAX.

A guest can build a tree deeper than PATH_MAX (4096 bytes, terminator
included) out of ordinary names, and QEMU then sends paths that no single
system call accepts. Such a path is opened one chunk of whole components at
a time with openat(2), each chunk shorter than PATH_MAX, down to the
directory that contains the last component. The request then runs on that
last name: with the directory as the working directory for one-path
requests, and through dir_fd arguments for LINK and RENAME. Resolution
stays inside the export, because the kernel resolves every chunk, `..` and
symlinks included, under the process's chroot.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager
from typing import Any, TypeVar

from . import protocol

PATH_MAX = 4096
NAME_MAX = 255

_DIRECTORY_FLAGS = os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC

ResultT = TypeVar("ResultT")


def is_long(path: bytes) -> bool:
    """Return True if `path` is too long for one system call but can be
    resolved a chunk at a time, because no name in it exceeds NAME_MAX."""
    if len(path) < PATH_MAX:
        return False
    return max(map(len, path.split(b"/"))) <= NAME_MAX


def split_last(path: bytes) -> tuple[bytes, bytes]:
    """Split `path` into (directory part, last name), keeping a trailing "/"
    on the name, where it means "must be a directory" as in mkdir("a/")."""
    stripped = path.rstrip(b"/")
    trailing = b"/" if len(stripped) < len(path) else b""
    directory, _, name = stripped.rpartition(b"/")
    if not directory and stripped.startswith(b"/"):
        directory = b"/"
    return directory, name + trailing


def chunks(directory: bytes) -> Iterator[bytes]:
    """Group the components of `directory` into runs shorter than PATH_MAX."""
    chunk = b"/" if directory.startswith(b"/") else b""
    for component in directory.split(b"/"):
        if not component:
            continue
        if len(chunk) + len(component) + 1 >= PATH_MAX:
            yield chunk
            chunk = b""
        chunk += component + b"/"
    if chunk:
        yield chunk


@contextmanager
def parent_directory(path: bytes) -> Iterator[tuple[int | None, bytes]]:
    """Open the directory that contains `path`'s last name.

    Yield (dir_fd, name), where dir_fd is None when the name is relative
    to the working directory (a path without any "/").
    """
    directory, name = split_last(path)
    if not directory:
        yield None, name
        return
    fd: int | None = None
    try:
        for chunk in chunks(directory):
            next_fd = os.open(chunk, _DIRECTORY_FLAGS, dir_fd=fd)
            if fd is not None:
                os.close(fd)
            fd = next_fd
        yield fd, name
    finally:
        if fd is not None:
            os.close(fd)


def call_in_parent(
    handler: Callable[[Any], ResultT], request: Any, field: str = "path"
) -> ResultT:
    """Run `handler` on `request` with its `field` shortened to the last
    name, from inside the directory that contains it."""
    with parent_directory(getattr(request, field)) as (fd, name):
        if fd is None:
            return handler(request._replace(**{field: name}))
        os.fchdir(fd)
        try:
            return handler(request._replace(**{field: name}))
        finally:
            os.chdir("/")


def link(request: protocol.Link) -> None:
    """LINK where either path may be longer than PATH_MAX."""
    with ExitStack() as stack:
        old_fd, old_name = stack.enter_context(parent_directory(request.oldpath))
        new_fd, new_name = stack.enter_context(parent_directory(request.newpath))
        os.link(
            old_name,
            new_name,
            src_dir_fd=old_fd,
            dst_dir_fd=new_fd,
            follow_symlinks=False,
        )


def rename(request: protocol.Rename) -> None:
    """RENAME where either path may be longer than PATH_MAX."""
    with ExitStack() as stack:
        old_fd, old_name = stack.enter_context(parent_directory(request.oldpath))
        new_fd, new_name = stack.enter_context(parent_directory(request.newpath))
        os.rename(old_name, new_name, src_dir_fd=old_fd, dst_dir_fd=new_fd)
