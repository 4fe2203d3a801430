"""One way for every command to fail: a single ``error: ...`` line on stderr, the traceback only on request.

Usage in an entry point::

    def main(argv: list[str] | None = None) -> int:
        return run_main(_main, argv)

``_main`` raises :class:`CLIError` for what the user passed (exit status 2 unless given) and may let the known
exceptions of bad input through (missing files or folders, unreadable or corrupt files, bad values): each becomes
one line and exit status 1. ``--debug`` on the command line, or ``LAF_DEBUG=1`` in the environment, re-raises instead
so the full traceback shows. Ctrl-C ends with status 130 and one line; files are written atomically, so what was
finished is complete and a rerun of the same command resumes. The checks shared by several commands (device, output
folder, input folder, numeric ranges) live here too, so each command runs them before it loads a model.
"""

import os
import sys
import tempfile
from collections.abc import Callable, Sequence
from pathlib import Path

DEBUG_ENV = "LAF_DEBUG"
KNOWN_ERRORS = (OSError, ValueError, ImportError)


class CLIError(Exception):
    """A problem with the command's input; the message names the value or file and says what to do.

    Args:
        message: One line.
        code: Exit status (2 = bad arguments, 1 = nothing could be done, 130 = interrupted).
    """

    def __init__(self, message: str, code: int = 2) -> None:
        super().__init__(message)
        self.code = code


def debug_requested(argv: Sequence[str] | None = None) -> bool:
    """True when ``--debug`` is among ``argv`` or ``LAF_DEBUG`` is set to a true value."""
    if os.environ.get(DEBUG_ENV, "").strip().lower() in ("1", "true", "yes", "on"):
        return True
    return "--debug" in (sys.argv[1:] if argv is None else argv)


def one_line(err: BaseException) -> str:
    """The exception's message on one line (its type name when it has none)."""
    text = " ".join(str(err).split())
    return text or type(err).__name__


def run_main(fn: Callable[[list[str]], int], argv: Sequence[str] | None = None) -> int:
    """Run ``fn(argv)`` and turn the known failures into one ``error:`` line and an exit status.

    Args:
        fn: The command body; returns the exit status.
        argv: Arguments (``None`` reads ``sys.argv[1:]``).

    Returns:
        ``fn``'s status, the :class:`CLIError`'s code, 1 for a known exception or 130 for Ctrl-C.
    """
    argv = list(sys.argv[1:] if argv is None else argv)
    debug = debug_requested(argv)
    try:
        return fn(argv)
    except CLIError as err:
        if debug:
            raise
        print(f"error: {one_line(err)}", file=sys.stderr)
        return err.code
    except KeyboardInterrupt:
        if debug:
            raise
        print("interrupted: finished files are complete; rerun the same command to resume", file=sys.stderr)
        return 130
    except KNOWN_ERRORS as err:
        if debug:
            raise
        print(f"error: {one_line(err)} (--debug or {DEBUG_ENV}=1 shows the traceback)", file=sys.stderr)
        return 1


def check_range(flag: str, value, *, low, high=None, low_open: bool = False) -> None:
    """Raise CLIError unless ``low <= value`` (``low < value`` with ``low_open``) and ``value <= high``; None passes."""
    if value is None:
        return
    if (value > low if low_open else value >= low) and (high is None or value <= high):
        return
    if high is None:
        wanted = f"{'>' if low_open else '>='} {low}"
    else:
        wanted = f"in {'(' if low_open else '['}{low}, {high}]"
    raise CLIError(f"{flag} must be {wanted}, got {value}")


def check_device(device: str, flag: str = "--device") -> None:
    """Raise CLIError when ``device`` is not a torch device string or is not available on this machine."""
    import torch

    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError):
        raise CLIError(f"{flag} {device!r} is not a device; use cpu, cuda or cuda:N") from None
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise CLIError(f"{flag} {device}: no CUDA GPU is available on this machine; use {flag} cpu")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise CLIError(f"{flag} {device}: only {torch.cuda.device_count()} CUDA device(s) here (cuda:0 ...)")
    elif dev.type == "mps":
        if not torch.backends.mps.is_available():
            raise CLIError(f"{flag} {device}: MPS is not available on this machine; use {flag} cpu")
    elif dev.type != "cpu":
        raise CLIError(f"{flag} {device!r} is not supported; use cpu or cuda")


def check_input_folder(path: Path | None, flag: str) -> Path:
    """Raise CLIError unless ``path`` is an existing folder."""
    if path is None:
        raise CLIError(f"{flag} is required")
    path = Path(path)
    if not path.exists():
        raise CLIError(f"{flag} {path} does not exist; pass an existing folder")
    if not path.is_dir():
        raise CLIError(f"{flag} {path} is a file; pass a folder")
    return path


def check_output_folder(path: Path, flag: str = "--out") -> Path:
    """Create ``path`` if needed and check that files can be written into it; raise CLIError otherwise."""
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise CLIError(f"{flag} {path} is a file; pass a folder (it is created when missing)")
    try:
        path.mkdir(parents=True, exist_ok=True)
        fd, probe = tempfile.mkstemp(dir=path, prefix=".write-test-")
        os.close(fd)
        os.unlink(probe)
    except OSError as err:
        why = err.strerror or one_line(err)
        raise CLIError(f"{flag} {path} is not writable ({why}); choose another folder") from None
    return path
