"""What every script shares with its user and with the disk, torch-free (report.py uses it too):
how a command ends (a fault is a row of FAULTS: one line, an exit status and, for a run, the
status its JSON records), how it prints (`say`), and how it writes: files and folders whole or
not at all (`write_atomic`), outputs checked before anything is written (`check_output`), one
writer per run (`take_lock`).

    with command_line("report.py"):      # a fault in here: its one line and exit status
        check_output(path, "--json")      # a place that cannot take the file: refused now
        write_atomic(path, text)          # readers see the old version or the new one
"""
import argparse
import errno
import os
import platform
import shutil
import sys
import tempfile
import time
from contextlib import contextmanager, suppress
from pathlib import Path
from typing import NamedTuple

from filelock import FileLock, Timeout

ENDED = ("finished", "diverged")  # nothing left to train; "running", "interrupted", "failed": more
STOPPED = "stopped (its JSON says running, but its process is gone)"  # and nobody holds its lock


class UsageError(Exception):
    """What the user must fix (a task, a path, a file, a value): one line, nothing written."""


class RunError(Exception):
    """What a run cannot go on from (a write that failed, a NaN loss, no result); `status`: what
    its JSON then says."""

    def __init__(self, message, status="failed"):
        super().__init__(message)
        self.status = status


class Interrupted(BaseException):
    """A stop signal, honoured at a step's end (run.StopRequest). A BaseException, as
    KeyboardInterrupt: no `except Exception` in library code takes it for its own error."""

    def __init__(self, message, signum):
        super().__init__(message)
        self.code = 128 + signum


def out_of_memory(error):
    """The allocator's error: MemoryError, torch's OutOfMemoryError, the CPU allocator's text."""
    return isinstance(error, MemoryError) or "OutOfMemoryError" in _names(error) or any(
        s in str(error) for s in ("out of memory", "can't allocate memory",
                                  "Cannot allocate memory"))


def peer_gone(error):
    """A collective that failed because another process of a torchrun launch is gone (gloo: its
    connection closed; NCCL: an error or timeout of the group)."""
    return "DistError" in _names(error) or isinstance(error, RuntimeError) and any(
        s in str(error) for s in ("Connection closed by peer", "Connection reset by peer",
                                  "NCCL", "gloo", "Broken pipe"))


def compile_failed(error):
    """torch.compile could not build the model's kernels (no C compiler for inductor or Triton,
    a lowering it lacks): its backend's error, whatever the inner cause."""
    return "BackendCompilerFailed" in _names(error)


def _names(error):
    return {c.__name__ for c in type(error).__mro__}


class Fault(NamedTuple):
    line: str         # what the user is told, on one line
    status: str       # what a run's JSON then records
    resumable: bool   # whether the same command with --resume continues from the checkpoint
    code: int         # the exit status
    own: bool         # this process's own: under torchrun each says its own, naming its rank
    changes: dict     # what --resume must change to go on (a setting: its new value)


# How a command ends, one row per kind of fault: the first row whose exception type (or test) the
# error passes. Anything else is a bug: its traceback is worth seeing (a run still ends `failed`).
FAULTS = [  # (type or test, line, status: None = the RunError's own, --resume goes on, code, own,
    #          what --resume must change)
    (Interrupted, "{e}", "interrupted", True, None, False, {}),
    (KeyboardInterrupt, "stopped at once (Ctrl-C)", "interrupted", True, 130, False, {}),
    (UsageError, "error: {e}", "failed", False, 1, False, {}),
    (RunError, "error: {e}", None, None, 1, False, {}),
    (out_of_memory, "error: out of memory ({e}): free memory, or use smaller batches "
                    "(--batch-size, --eval-batch-size, --max-length) or --bf16", "failed", True,
     1, True, {}),
    (compile_failed, "error: --compile failed ({cause}): run without it (compiled or not, the "
                     "numbers differ by float rounding only)", "failed", True, 1, True,
     {"compile": False}),
    (peer_gone, "error: another process of this torchrun launch is gone ({kind}: its own line, "
                "or torchrun's report of its exit, says why)", "failed", True, 1, True, {}),
    (OSError, "error: {file}: {why}", "failed", True, 1, True, {}),
]


def fault(error):
    """The Fault an exception is (FAULTS), or None for a bug. A run that --resume continues
    adds how (`resume`, run.end)."""
    for kind, line, status, resumable, code, own, changes in FAULTS:
        if isinstance(error, kind) if isinstance(kind, type) else kind(error):
            status = status or error.status
            cause = getattr(error, "inner_exception", error)  # what a compiler's error wraps
            line = line.format(e=str(error) or type(error).__name__, kind=type(error).__name__,
                               why=why(error), file=getattr(error, "filename", None) or "a file",
                               cause=f"{type(cause).__name__}: {first_line(cause)}")
            return Fault(line + getattr(error, "resume", ""), status,
                         status == "failed" if resumable is None else resumable,
                         code or error.code, own, changes)
    return None


def first_line(error):
    """An error's message up to its first line break (a compiler's or a reader's detail may
    follow); its type's name if it has none."""
    return (str(error).strip() or type(error).__name__).splitlines()[0]


def why(error):
    """An OSError's cause in words, mid-sentence: 'no space left on device'."""
    text = getattr(error, "strerror", None) or str(error)
    return text[:1].lower() + text[1:]


@contextmanager
def command_line(prog):
    """Around a script's main(): a fault ends the process with its one line (on stderr) and
    its exit status, no traceback; a bug keeps its traceback. Under torchrun (RANK set) what
    every process sees alike is said by rank 0 alone, a process's own fault by that process,
    naming its rank."""
    rank, world = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
    with suppress(ImportError):  # offline, the hub's retry messages would bury our one line
        from huggingface_hub.utils import logging
        logging.set_verbosity_error()
    for stream in (sys.stdout, sys.stderr):  # what the terminal's encoding cannot show: escaped
        with suppress(AttributeError, ValueError):
            stream.reconfigure(errors="backslashreplace")
    try:
        yield
    except BaseException as error:
        f = fault(error)
        if f is None:
            raise
        line = one_line(f"{prog}: {f'rank {rank}: ' * (f.own and world > 1)}{f.line}")
        if f.code == 1 and (f.own or rank == 0):
            raise SystemExit(line) from None  # Python says it on stderr, and exits 1
        if f.own or rank == 0:
            say(line, err=True, everywhere=True)
        raise SystemExit(f.code) from None
    finally:
        distributed = sys.modules.get("torch.distributed")
        if distributed is not None and distributed.is_available() and \
                distributed.is_initialized():
            distributed.destroy_process_group()


@contextmanager
def user_errors():
    """What bad input raises while a script loads its data and model, as a UsageError."""
    try:
        yield
    except (ValueError, OSError, RuntimeError) as e:  # RuntimeError: an unusable device
        raise UsageError(str(e)) from e


class Parser(argparse.ArgumentParser):
    def error(self, message):  # one line, no usage dump; under torchrun from rank 0 only
        say(f"{self.prog}: error: {message} (see --help)", err=True)
        self.exit(2)


def one_line(text):
    """A message kept on one line: a control character of a value (a newline in a folder's
    name) written as its escape."""
    return "".join(c if c.isprintable() else repr(c)[1:-1] for c in text)


def say(text="", err=False, end="\n", everywhere=False):
    """The one way the project prints: to stdout, or to stderr (err: kept on one line), flushed;
    under torchrun by rank 0 alone unless `everywhere`. A stream that fails (its reader gone,
    the terminal gone) goes quiet, the null device in its place; for a training run the
    SIGPIPE or SIGHUP that comes with it is a stop request (run.StopRequest)."""
    stream = sys.stderr if err else sys.stdout
    if stream is None or not (everywhere or os.environ.get("RANK", "0") == "0"):
        return
    try:
        print(one_line(text) if err else text, end=end, file=stream, flush=True)
    except (OSError, ValueError):  # ValueError: a closed file
        with suppress(OSError, ValueError):
            os.dup2(os.open(os.devnull, os.O_WRONLY), stream.fileno())


# ---------------------------------------------------------------------------------------------
# Files: written whole, checked first, one writer per run

def write_atomic(path, data):
    """Write bytes (or str, as UTF-8) -- or a folder: data(tmp) writes it -- under a temporary
    name of this process beside path, then rename it over path: readers see the old version or
    the new one, never a part (a link stays; the file or folder it names is replaced). A file's
    bytes are on the disk (fsync) before the rename, for a machine that goes down. A device
    or a pipe is written into, never replaced (`special`). A failed write removes the
    temporary, keeps the old version and is a RunError saying so; what a killed earlier write
    of the folder left is undone first (`remove_stale`)."""
    path, folder = Path(path), callable(data)
    data = data.encode() if isinstance(data, str) else data
    if not folder and special(path):
        try:
            path.write_bytes(data)
        except OSError as e:
            raise RunError(f"cannot write {path}: {why(e)}") from e
        return
    path = path.resolve() if path.is_symlink() else path
    tmp, old = (path.with_name(f".{path.name}.{os.getpid()}.{k}") for k in ("tmp", "old"))
    kept = "what was there is kept" if folder else "the previous version is kept" \
        if path.exists() else "no half-written file is left"
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        if folder:
            remove_stale(path)
            data(tmp)
            if path.exists():
                os.replace(path, old)  # killed before the next rename: remove_stale undoes it
        else:
            with open(tmp, "wb") as f:  # mode 0666 & ~umask, like any other file
                f.write(data)
                f.flush()  # on the disk before the rename: a machine that goes down leaves
                os.fsync(f.fileno())  # the old version or the new one, never an empty file
        os.replace(tmp, path)
    except BaseException as e:
        _remove(tmp)
        if folder and old.exists() and not path.exists():
            os.replace(old, path)
        if isinstance(e, OSError):
            raise RunError(f"cannot write {path}: {why(e)}; {kept}") from e
        raise
    _remove(old)


def remove_stale(path):
    """What a killed write_atomic to path left: its temporary removed, a folder moved aside
    whose new version never arrived put back."""
    path = Path(path)
    for stale in sorted(path.parent.glob(f".{path.name}.*[0-9].*")):
        if stale.suffix == ".old" and not path.exists():
            os.replace(stale, path)
        elif stale.suffix in (".tmp", ".old"):
            _remove(stale)


def special(path):
    """Whether path names a device or a pipe (/dev/null, /dev/stdout, a shell's >(...)): what a
    write goes into where it is. Renamed over, it would become a file (/dev/null, as root)."""
    return os.path.exists(path) and not (os.path.isfile(path) or os.path.isdir(path))


def _remove(path):
    with suppress(OSError):
        shutil.rmtree(path) if path.is_dir() and not path.is_symlink() else path.unlink()


def not_a_folder(path):
    """Why path is not a folder, in words ('no such folder', 'a file, not a folder', 'too many
    levels of symbolic links', ...); None if it is one."""
    try:
        os.stat(path)  # what stands in the way, if anything
    except FileNotFoundError:
        return "no such folder"
    except OSError as e:
        return why(e)
    return None if os.path.isdir(path) else "a file, not a folder"


def check_output(path, option, folder=True, given=None):
    """Before anything is written: a folder to write into (folder=True; made as needed), or a
    file's place, must be able to take it -- no file where a folder belongs, and the deepest
    part that exists takes a file, checked by writing one (as root, os.access says yes also on
    a read-only file system). A UsageError naming the option (and `given`: what the user said,
    if path is made from it) otherwise."""
    path, named = Path(path), f"{option} {path if given is None else given}"
    if not folder and special(path):  # written into where it is (`write_atomic`)
        if not os.access(path, os.W_OK):
            raise UsageError(f"{named}: cannot write it: permission denied")
        return
    if not folder and path.is_dir():
        raise UsageError(f"{named}: a folder, not a file")
    if path.is_symlink():
        problem = not_a_folder(path)
        if problem and problem != "no such folder" and (folder or problem != "a file, not a "
                                                                           "folder"):
            raise UsageError(f"{named}: {problem}")  # a link loop, a link to a file
    path = path.resolve() if folder else path.resolve().parent
    try:
        existing = next(p for p in (path, *path.parents) if p.exists())
        if not existing.is_dir():
            raise UsageError(f"{named}: {existing} is a file, not a folder")
        fd, probe = tempfile.mkstemp(dir=existing, prefix=".write-test-")
        os.close(fd)
        os.unlink(probe)
    except OSError as e:
        raise UsageError(f"{named}: cannot write in {existing}: {why(e)}") from None


NO_LOCKS = {getattr(errno, n) for n in ("ENOLCK", "EOPNOTSUPP", "ENOTSUP", "ENOSYS", "EINVAL")
            if hasattr(errno, n)}


def take_lock(path):
    """One writer per run: filelock's exclusive lock on <run>.lock, the file naming its holder
    (where the disk has room for that line). The kernel drops the lock when its holder dies: the
    file a killed run leaves locks nothing. A file system without locks (some Lustre or FUSE
    mounts) runs unlocked, saying so."""
    lock = FileLock(str(path))
    try:
        lock.acquire(blocking=False)
    except Timeout:
        by = holder(path) or "another process"  # which may have ended since
        raise UsageError(f"{Path(path).with_suffix('')} is being run by {by}: one process per "
                         f"run (wait for it to end, or stop it)") from None
    except (OSError, NotImplementedError) as e:  # NotImplementedError: filelock's "no flock"
        if getattr(e, "errno", errno.ENOSYS) not in NO_LOCKS:
            raise UsageError(f"cannot take the run's lock {path}: {why(e)}") from None
        Path(path).unlink(missing_ok=True)
        say(f"note: {Path(path).parent} offers no file locks ({why(e)}): nothing stops a second "
            f"process from writing this run at the same time")
        return None
    with suppress(OSError), open(path, "w") as f:  # a full disk: the run's first write says so
        f.write(f"pid {os.getpid()} on {platform.node()} since {time.strftime('%c')}")
    return lock


def holder(path):
    """Who holds a run's lock ('pid P on HOST since ...'); None if nobody does: no lock file, or
    one its dead holder left (a lock we can take and let go at once); 'unknown' where the lock
    cannot be tried (a folder we may not write, a file system without locks)."""
    if not Path(path).exists():
        return None
    lock = FileLock(str(path))
    try:
        lock.acquire(blocking=False)
    except Timeout:
        with suppress(OSError):
            return Path(path).read_text(errors="replace").strip() or "another process"
        return "another process"
    except (OSError, NotImplementedError):
        return "unknown"
    lock.release()
    return None
