"""Low-level file helpers: atomic replacement and locating adapter files.

A file is replaced atomically: the new bytes go to a temporary file in the same folder, are flushed to disk,
and only then renamed over the old one, so a crash or an exception mid-write leaves the old file intact.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path

from lorakit.errors import AdapterFileError


def _fsync_path(path: str) -> None:
    with contextlib.suppress(OSError):  # not every file system lets a folder be fsync'ed
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def atomic_write_files(writers: dict[str, Callable[[str], None]]) -> None:
    """Write several files so that none is replaced unless all were written completely.

    Args:
        writers: destination path -> function writing the complete content to the path it is given.

    Every content goes to a temporary file beside its destination and is flushed to disk; only when all
    writers have succeeded are the temporary files renamed into place, back to back. If any writer raises
    (or the process is interrupted before the renames), nothing at the destinations changes.
    """
    staged: list[tuple[str, str]] = []
    try:
        for dest, write in writers.items():
            folder = os.path.dirname(os.path.abspath(dest))
            fd, tmp = tempfile.mkstemp(prefix=f".{os.path.basename(dest)}.", suffix=".tmp", dir=folder)
            os.close(fd)
            staged.append((tmp, dest))
            write(tmp)
            _fsync_path(tmp)
    except BaseException:
        for tmp, _ in staged:
            with contextlib.suppress(OSError):
                os.unlink(tmp)
        raise
    for tmp, dest in staged:
        os.replace(tmp, dest)
    for folder in {os.path.dirname(os.path.abspath(dest)) for _, dest in staged}:
        _fsync_path(folder)


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    """Replace ``path`` with ``data`` atomically."""

    def write(tmp: str) -> None:
        with open(tmp, "wb") as fh:
            fh.write(data)

    atomic_write_files({os.fspath(path): write})


def atomic_write_dir(target: str | os.PathLike, fill: Callable[[Path], None]) -> Path:
    """Create or replace the folder ``target`` with what ``fill`` writes into a fresh temporary folder.

    ``fill`` writes into a hidden sibling of ``target``; only when it returns is that folder moved into place.
    An existing ``target`` is first renamed aside and deleted only after the new one is in place, so at every
    moment either the old or the new complete folder exists on disk. If ``fill`` raises (or the process dies),
    ``target`` is untouched and the temporary folder is removed (or left hidden, never under ``target``'s name).
    """
    target = Path(target).expanduser().absolute()
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=target.parent))
    try:
        fill(tmp)
        os.chmod(tmp, 0o755)  # mkdtemp makes it 0700
        for root, _, files in os.walk(tmp):
            for name in files:
                _fsync_path(os.path.join(root, name))
        old = None
        if target.exists():
            old = Path(tempfile.mkdtemp(prefix=f".{target.name}.old-", dir=target.parent))
            os.rmdir(old)
            os.replace(target, old)
        os.replace(tmp, target)
        _fsync_path(str(target.parent))
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return target


def resolve_adapter_file(path: str | os.PathLike, filename: str, subfolder: str | None = None) -> str:
    """The local path of ``filename`` in an adapter folder, a file path itself, or a cached hub repo.

    Raises:
        AdapterFileError: the folder or file does not exist (the message lists what the folder holds).
    """
    path = os.fspath(path)
    if os.path.isfile(path) and subfolder is None:
        return path
    folder = os.path.join(path, subfolder) if subfolder else path
    if os.path.isdir(folder):
        file = os.path.join(folder, filename)
        if os.path.isfile(file):
            return file
        present = sorted(os.listdir(folder))
        raise AdapterFileError(f"{filename!r} not found in adapter folder {folder!r}; it holds {present or 'nothing'}")
    looks_local = os.path.exists(path) or path.startswith((".", "/", "~")) or path.count("/") > 1
    if looks_local:
        raise AdapterFileError(f"adapter folder {folder!r} does not exist")
    return _from_hub_cache(path, filename, subfolder)


def _from_hub_cache(repo_id: str, filename: str, subfolder: str | None) -> str:
    try:
        from huggingface_hub import hf_hub_download

        return hf_hub_download(repo_id, filename, subfolder=subfolder)
    except Exception as exc:  # offline, unknown repo, missing file: all mean "not available here"
        raise AdapterFileError(
            f"adapter {repo_id!r} is neither a local folder nor available from the Hugging Face cache "
            f"({type(exc).__name__}); pass the path of a folder holding {filename!r}"
        ) from exc
