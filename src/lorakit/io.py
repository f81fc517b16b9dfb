"""Low-level file helpers: saves that change a folder as a unit, locks, and locating adapter files (in a local
folder, or on the Hugging Face hub through ``hf_hub_download`` with the load's hub options, :func:`hub_options`).

What lorakit writes is never seen half-written, and two writers never interleave:

* :func:`atomic_write_files` replaces several files of one folder together (an adapter's config and weights).
  Each new content goes to a hidden temporary file beside its destination and is flushed to disk; then a
  *journal* naming every pending rename is written (atomically) and only then are the files renamed into
  place and the journal removed. A save killed before the journal exists changed nothing; one killed after it
  is completed ("rolled forward") by the next reader or writer of the folder, so the folder always reads as
  the old or the new set of files, never a mix (:func:`recover_folder`).
* :func:`atomic_write_dir` builds a whole folder in a hidden sibling and swaps it in with one
  ``renameat2(RENAME_EXCHANGE)`` where the system has it (else two renames, with the same recovery).
* Writers of one place hold an exclusive lock (``flock`` on the folder, or on its parent for a folder swap), so
  two threads or processes saving to one place are serialised, each save whole; readers of an adapter folder
  hold a shared lock (:func:`reading_folder`) so they never see one save's config beside another's weights.
* The next save to a place removes the temporary files and folders that a killed save left there.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import json
import os
import shutil
import sys
import tempfile
import threading
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any

from lorakit.errors import AdapterFileError, ConfigError, suggest

try:
    import fcntl
except ImportError:  # pragma: no cover - Windows: locks are process-local (threads only)
    fcntl = None

#: The journal of an adapter-folder save in progress (see :func:`atomic_write_files`).
JOURNAL_NAME = ".lorakit-save.json"
_TMP_SUFFIX = ".lorakit-tmp"


def crash_point(label: str) -> None:
    """Called between the file operations of every save; tests replace it to kill a save at each point."""


def _file_mode() -> int:
    """The mode a plain ``open()`` would give a new file (0666 less the umask): temporary files start as 0600."""
    try:
        with open("/proc/self/status") as fh:  # reading the umask without setting it (os.umask is process-wide)
            umask = next(int(line.split()[1], 8) for line in fh if line.startswith("Umask:"))
    except (OSError, StopIteration, ValueError, IndexError):
        umask = 0o022
    return 0o666 & ~umask


def _fsync_path(path: str) -> None:
    with contextlib.suppress(OSError):  # not every file system lets a folder be fsync'ed
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


# -- locks -------------------------------------------------------------------------------------------------

_process_locks: dict[str, threading.Lock] = {}
_process_locks_guard = threading.Lock()


@contextlib.contextmanager
def _flock(path: str, shared: bool = False, blocking: bool = True) -> Iterator[bool]:
    """Hold a ``flock`` on ``path`` (a folder or a file, opened read-only). Yields False if not blocking and held.

    Each call opens its own descriptor, so the lock excludes other threads of this process as well as other
    processes (``flock`` locks belong to the open file, not the process).
    """
    if fcntl is None:  # pragma: no cover
        with _process_locks_guard:
            lock = _process_locks.setdefault(os.path.abspath(path), threading.Lock())
        got = lock.acquire(blocking)
        try:
            yield got
        finally:
            if got:
                lock.release()
        return
    fd = os.open(path, os.O_RDONLY)
    try:
        op = (fcntl.LOCK_SH if shared else fcntl.LOCK_EX) | (0 if blocking else fcntl.LOCK_NB)
        try:
            fcntl.flock(fd, op)
        except BlockingIOError:
            yield False
            return
        except OSError as exc:
            if exc.errno not in (errno.ENOLCK, errno.EOPNOTSUPP, errno.EINVAL):
                raise
            # a file system without flock (some network mounts): saves still replace files atomically
        yield True
    finally:
        os.close(fd)


@contextlib.contextmanager
def exclusive_lock(path: str | os.PathLike, purpose: str) -> Iterator[None]:
    """Hold an exclusive lock on the file ``path`` (created if needed) or refuse at once.

    Args:
        purpose: what the holder does, for the error message (e.g. "lorakit train --output runs/x").

    Raises:
        AdapterFileError: another process or thread holds it; the message names the holder's pid.
    """
    path = os.fspath(path)
    try:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    except OSError as exc:
        raise AdapterFileError(f"cannot create lock file {path!r}: {exc.strerror or exc}") from exc
    os.close(fd)
    with _flock(path, blocking=False) as got:
        if not got:
            try:
                holder = Path(path).read_text().strip() or "unknown"
            except OSError:
                holder = "unknown"
            raise AdapterFileError(
                f"{purpose}: another process is writing there (lock {path!r} held by pid {holder}); wait for it to "
                "finish or use another folder"
            )
        with contextlib.suppress(OSError):
            Path(path).write_text(f"{os.getpid()}\n")
        yield


@contextlib.contextmanager
def writing_folder(folder: str | os.PathLike) -> Iterator[None]:
    """Exclusive access to an existing folder for one save (blocks while another save or a reader holds it)."""
    with _flock(os.fspath(folder)):
        yield


@contextlib.contextmanager
def reading_folder(folder: str | os.PathLike) -> Iterator[None]:
    """Shared access to a local adapter folder while its files are read: no save is between renames meanwhile.

    A save that was killed between its renames is completed first (:func:`recover_folder`). Paths that are not
    local folders (hub ids, single files) are read without a lock.
    """
    folder = os.fspath(folder)
    if not os.path.isdir(folder):
        yield
        return
    with contextlib.ExitStack() as stack:
        while True:
            recover_folder(folder)
            with contextlib.suppress(OSError):  # a folder we may not open for locking: read without the lock
                stack.enter_context(_flock(folder, shared=True))
            # a save killed between our recovery and our lock leaves a journal: release, complete it, retry
            # (while we hold the shared lock no save can start, so none appears after this check)
            if not os.path.exists(os.path.join(folder, JOURNAL_NAME)):
                break
            stack.close()
        yield


# -- saving a set of files -----------------------------------------------------------------------------------


def recover_folder(folder: str | os.PathLike) -> None:
    """Complete a save of ``folder`` that was killed between its renames, and remove leftover temporary files.

    Raises:
        AdapterFileError: the folder holds an unfinished save but cannot be written (read-only).
    """
    folder = os.fspath(folder)
    if not os.path.exists(os.path.join(folder, JOURNAL_NAME)):
        return
    try:
        with writing_folder(folder):
            _roll_forward(folder)
    except OSError as exc:
        raise AdapterFileError(
            f"adapter folder {folder!r} holds a save that was interrupted ({JOURNAL_NAME}) and cannot be completed "
            f"here: {exc.strerror or exc}; open it once with write access"
        ) from exc


def _roll_forward(folder: str) -> None:
    """With the folder's lock held: finish the renames a journal lists, then drop stray temporary files."""
    journal = os.path.join(folder, JOURNAL_NAME)
    if os.path.exists(journal):
        try:
            with open(journal, encoding="utf-8") as fh:
                entry = json.load(fh)
            pairs = [(str(tmp), str(dest)) for tmp, dest in entry["renames"]]
            removals = [str(name) for name in entry.get("removals", [])]
        except (OSError, ValueError, KeyError, TypeError, AttributeError) as exc:
            raise AdapterFileError(f"the save journal {journal!r} is unreadable ({exc}); remove it by hand") from exc
        for name in [n for pair in pairs for n in pair] + removals:
            if os.sep in name or "/" in name or name in ("", ".", ".."):
                raise AdapterFileError(f"the save journal {journal!r} names a path outside its folder: {name!r}")
        _apply(folder, pairs, removals)
        os.unlink(journal)
        _fsync_path(folder)
    for name in os.listdir(folder):
        if name.startswith(".") and name.endswith(_TMP_SUFFIX):
            with contextlib.suppress(OSError):
                os.unlink(os.path.join(folder, name))


def _apply(folder: str, renames: list[tuple[str, str]], removals: list[str]) -> None:
    """The journal's steps, each safe to repeat: rename staged files into place, then delete ``removals``."""
    for tmp, dest in renames:
        src = os.path.join(folder, tmp)
        if os.path.exists(src):
            os.replace(src, os.path.join(folder, dest))
            crash_point(f"renamed {dest}")
    for name in removals:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(os.path.join(folder, name))
    _fsync_path(folder)


def atomic_write_files(
    folder: str | os.PathLike, writers: dict[str, Callable[[str], None]], removals: tuple[str, ...] = ()
) -> None:
    """Replace the files ``writers`` names in ``folder`` together: afterwards all are new, or (on any error, or
    a kill) all are as before.

    Args:
        folder: an existing folder.
        writers: file name (no path) -> function writing the complete content to the path it is given.
        removals: file names to delete in the same step (e.g. a weights file of the other format).

    The steps: lock the folder; complete or clean up what an earlier killed save left; write every content to
    a hidden temporary file and flush it; write the journal of renames (atomically); rename the files into
    place; delete the journal. A kill before the journal leaves the old files; after it, the next
    :func:`recover_folder` (every reader and writer calls it) finishes the renames.

    Raises:
        OSError: a write failed (full disk, I/O error); nothing at the destinations changed.
    """
    folder = os.fspath(folder)
    for name in [*writers, *removals]:
        if os.sep in name or name.startswith("."):
            raise ValueError(f"atomic_write_files takes plain file names, got {name!r}")
    with writing_folder(folder):
        crash_point("locked")
        _roll_forward(folder)
        staged: list[tuple[str, str]] = []
        mode = _file_mode()
        try:
            for name, write in writers.items():
                fd, tmp = tempfile.mkstemp(prefix=f".{name}.", suffix=_TMP_SUFFIX, dir=folder)
                os.close(fd)
                staged.append((os.path.basename(tmp), name))
                write(tmp)
                os.chmod(tmp, mode)
                _fsync_path(tmp)
                crash_point(f"staged {name}")
            journal = json.dumps({"renames": staged, "removals": list(removals)}).encode()
            fd, tmp_journal = tempfile.mkstemp(prefix=f"{JOURNAL_NAME}.", suffix=_TMP_SUFFIX, dir=folder)
            with os.fdopen(fd, "wb") as fh:
                fh.write(journal)
                fh.flush()
                os.fsync(fh.fileno())
            crash_point("journal staged")
        except BaseException:
            for tmp, _ in staged:
                with contextlib.suppress(OSError):
                    os.unlink(os.path.join(folder, tmp))
            with contextlib.suppress(OSError, UnboundLocalError):
                os.unlink(tmp_journal)
            raise
        os.replace(tmp_journal, os.path.join(folder, JOURNAL_NAME))
        _fsync_path(folder)
        crash_point("journal written")
        _apply(folder, staged, list(removals))
        os.unlink(os.path.join(folder, JOURNAL_NAME))
        _fsync_path(folder)
        crash_point("done")


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    """Replace the file ``path`` with ``data`` atomically (its folder must exist)."""

    def write(tmp: str) -> None:
        with open(tmp, "wb") as fh:
            fh.write(data)

    path = os.path.abspath(os.fspath(path))
    atomic_write_files(os.path.dirname(path), {os.path.basename(path): write})


# -- saving a whole folder -----------------------------------------------------------------------------------

_RENAME_EXCHANGE = 2
_AT_FDCWD = -100


def _exchange(a: str, b: str) -> bool:
    """Swap two paths in one atomic step (Linux ``renameat2(RENAME_EXCHANGE)``); False where unavailable."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        renameat2 = libc.renameat2
    except (OSError, AttributeError):
        return False
    renameat2.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    if renameat2(_AT_FDCWD, os.fsencode(a), _AT_FDCWD, os.fsencode(b), _RENAME_EXCHANGE) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.ENOSYS, errno.EINVAL, errno.EOPNOTSUPP):  # kernel or file system without it
        return False
    raise OSError(err, os.strerror(err), b)


def _clean_dir_leftovers(target: Path) -> None:
    """With the parent's lock held: restore a folder that a killed swap left only under its aside name, then
    remove the temporary folders of killed saves to ``target``."""
    parent = target.parent
    olds = sorted(parent.glob(f".{target.name}.old-*"), key=lambda p: p.stat().st_mtime)
    if olds and not target.exists():
        os.replace(olds.pop(), target)  # killed between the two renames: the old folder was complete
    for leftover in [*olds, *parent.glob(f".{target.name}.tmp-*")]:
        shutil.rmtree(leftover, ignore_errors=True)


def atomic_write_dir(target: str | os.PathLike, fill: Callable[[Path], None]) -> Path:
    """Create or replace the folder ``target`` with what ``fill`` writes into a fresh temporary folder.

    ``fill`` writes into a hidden sibling of ``target``; only when it returns is that folder swapped in, in one
    atomic exchange where the system has it. Saves to folders of one parent are serialised by a lock on the
    parent, and each first removes what earlier killed saves left. If ``fill`` raises (or the process dies),
    ``target`` is untouched and the temporary folder is removed (now, or by the next save).
    """
    target = Path(target).expanduser().absolute()
    target.parent.mkdir(parents=True, exist_ok=True)
    with writing_folder(target.parent):
        _clean_dir_leftovers(target)
        tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=target.parent))
        old: Path | None = None
        try:
            fill(tmp)
            os.chmod(tmp, 0o755)  # mkdtemp makes it 0700
            for root, _, files in os.walk(tmp):
                for name in files:
                    _fsync_path(os.path.join(root, name))
            crash_point("folder filled")
            if target.exists() and _exchange(str(tmp), str(target)):
                crash_point("folder swapped")
                _fsync_path(str(target.parent))
                shutil.rmtree(tmp, ignore_errors=True)  # tmp now holds the old folder
                return target
            if target.exists():
                old = Path(tempfile.mkdtemp(prefix=f".{target.name}.old-", dir=target.parent))
                os.rmdir(old)
                os.replace(target, old)
                crash_point("old folder aside")
            os.replace(tmp, target)
            crash_point("folder renamed")
            _fsync_path(str(target.parent))
            _clean_dir_leftovers(target)
        except BaseException as exc:
            shutil.rmtree(tmp, ignore_errors=True)
            if old is not None and old.exists() and not target.exists():
                os.replace(old, target)  # the new folder never arrived: put the old one back
            if isinstance(exc, OSError) and not isinstance(exc, AdapterFileError):  # full disk, I/O error
                raise AdapterFileError(
                    f"cannot write {target}: {exc.strerror or exc}; what was there before is unchanged"
                ) from exc
            raise
    return target


# -- outputs beside inputs -----------------------------------------------------------------------------------


def check_output_apart(output: str | os.PathLike, inputs: dict[str, str | os.PathLike | None], flag: str) -> None:
    """Refuse an output folder that is, or contains, one of the inputs (replacing it would delete that input).

    Args:
        inputs: what each input is (e.g. "--adapter") -> its path; hub ids and None are skipped.
        flag: the output's name for the message (e.g. "--output").

    Raises:
        AdapterFileError: naming the output and the input it would swallow.
    """
    out = Path(output).expanduser().resolve()
    for what, path in inputs.items():
        if path is None or not Path(path).expanduser().exists():
            continue
        inp = Path(path).expanduser().resolve()
        if inp == out or out in inp.parents:
            relation = "is" if inp == out else "contains"
            raise AdapterFileError(
                f"{flag} {output} {relation} the {what} input {path}: writing there would replace what is being read; "
                f"choose an {flag} folder outside it"
            )


# -- finding adapter files -----------------------------------------------------------------------------------

#: What a load hands to ``huggingface_hub.hf_hub_download`` for an adapter that is not a local folder (PEFT's
#: names, with ``subfolder``, which every load takes as its own argument). A local folder ignores them, as in PEFT.
HUB_OPTIONS = ("revision", "token", "cache_dir", "local_files_only")


def hub_options(kwargs: dict[str, Any], where: str, accepted: Iterable[str] = ()) -> dict[str, Any]:
    """Take the hub options (:data:`HUB_OPTIONS`) out of a load's ``**kwargs``, checked, and refuse any other name.

    Args:
        kwargs: the caller's ``**kwargs``; the hub options are removed from it.
        where: the function the arguments were given to, for the messages.
        accepted: further names the caller reads from ``kwargs`` itself (left there).

    Returns:
        every hub option, defaults filled in (``revision``, ``token``, ``cache_dir``: None; ``local_files_only``:
        False), ready for ``hf_hub_download(**...)``.

    Raises:
        ConfigError: an unknown keyword argument (named, with what is accepted), or a value of the wrong type.
    """
    out: dict[str, Any] = {name: kwargs.pop(name, None) for name in HUB_OPTIONS}
    if out["local_files_only"] is None:
        out["local_files_only"] = False
    accepted = tuple(accepted)
    unknown = [name for name in kwargs if name not in accepted]
    if unknown:
        hint = "; pass token= instead (huggingface_hub's name)" if "use_auth_token" in unknown else ""
        names = ", ".join(f"{n}=" for n in (*HUB_OPTIONS, *accepted))
        raise ConfigError(
            f"{where} got unknown keyword argument{'s' if len(unknown) > 1 else ''} "
            f"{', '.join(repr(n) for n in unknown)}{hint}{suggest(unknown[0], [*HUB_OPTIONS, *accepted])}; "
            f"besides its named parameters it takes the hub options {names}"
        )
    checks = {"revision": (str,), "token": (str, bool), "cache_dir": (str, os.PathLike), "local_files_only": (bool,)}
    for name, types in checks.items():
        if out[name] is not None and not isinstance(out[name], types):
            raise ConfigError(
                f"{where}: {name}={out[name]!r} is invalid; accepted: {' or '.join(t.__name__ for t in types)} or None"
            )
    if out["cache_dir"] is not None:
        out["cache_dir"] = os.fspath(out["cache_dir"])
    return out


def is_local_path(path: str | os.PathLike) -> bool:
    """Whether ``path`` names a local file or folder (or looks like one: it never names a hub repo then)."""
    text = os.fspath(path)
    return os.path.exists(text) or text.startswith((".", "/", "~")) or text.count("/") > 1


def resolve_adapter_file(
    path: str | os.PathLike, filename: str, subfolder: str | None = None, hub: dict[str, Any] | None = None
) -> str:
    """The local path of ``filename`` in an adapter folder, a file path itself, or a hub repo.

    Args:
        path: a local folder, a file, or a hub repo id (``user/name``).
        subfolder: the folder inside ``path`` (PEFT's layout: an adapter other than ``default``).
        hub: for a repo id, what :func:`hub_options` returned (revision, token, cache_dir, local_files_only),
            passed to ``huggingface_hub.hf_hub_download``; ignored for local paths.

    Raises:
        AdapterFileError: the folder or file does not exist (the message lists what the folder holds), or the
            hub could not provide it (the message gives the hub's reason).
    """
    path = os.fspath(path)
    if os.path.isfile(path) and subfolder is None:
        return path
    folder = os.path.join(path, subfolder) if subfolder else path
    if os.path.isdir(folder):
        recover_folder(folder)
        file = os.path.join(folder, filename)
        if os.path.isfile(file):
            return file
        present = sorted(os.listdir(folder))
        raise AdapterFileError(f"{filename!r} not found in adapter folder {folder!r}; it holds {present or 'nothing'}")
    if is_local_path(path):
        raise AdapterFileError(f"adapter folder {folder!r} does not exist")
    return _from_hub(path, filename, subfolder, hub or {})


def _from_hub(repo_id: str, filename: str, subfolder: str | None, hub: dict[str, Any]) -> str:
    """``hf_hub_download`` of one file, every hub option passed through; its errors as :class:`AdapterFileError`."""
    options = {"revision": None, "token": None, "cache_dir": None, "local_files_only": False, **hub}
    try:
        from huggingface_hub import hf_hub_download
    except ImportError as exc:  # pragma: no cover - installed with transformers
        raise AdapterFileError(f"adapter {repo_id!r} is not a local folder, and huggingface_hub is missing") from exc
    try:
        return hf_hub_download(repo_id, filename, subfolder=subfolder, **options)
    except Exception as exc:  # offline, unknown repo or revision, no access, missing file: all mean "not available"
        where = f"{subfolder}/{filename}" if subfolder else filename
        reason = (str(exc).strip().splitlines() or [""])[0][:300]
        revision = f" at revision {options['revision']!r}" if options["revision"] else ""
        cached = " in the local Hugging Face cache (local_files_only=True)" if options["local_files_only"] else ""
        raise AdapterFileError(
            f"adapter {repo_id!r} is neither a local folder nor available from the Hugging Face hub{cached}: "
            f"{where!r}{revision} could not be fetched ({type(exc).__name__}: {reason}); pass the path of a folder "
            f"holding {filename!r}, or check the repo id, revision= and token="
        ) from exc


def hub_snapshot(file: str) -> str | None:
    """The commit a file fetched by :func:`_from_hub` belongs to (its cache path holds ``snapshots/<commit>/``),
    so the other files of one adapter can be fetched from the same commit; None for anything else."""
    parts = os.path.normpath(file).split(os.sep)
    for i in range(len(parts) - 2, 0, -1):
        if parts[i - 1] == "snapshots" and len(parts[i]) == 40 and all(c in "0123456789abcdef" for c in parts[i]):
            return parts[i]
    return None
