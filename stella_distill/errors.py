"""The one exception type for user mistakes; the CLI prints its message and exits 2."""


class UserError(Exception):
    """Bad input (config, file, cache, checkpoint) that the user must fix.

    The message names the file and line or the config field. The CLI prints it on one line,
    without a traceback, and exits with code 2.
    """


class ConfigError(UserError, ValueError):
    """A user mistake in a config file or override; the message names the field."""


def first_line(exc: BaseException) -> str:
    """The first line of ``exc``'s message (its type name when the message is empty): library errors
    often carry pages of detail, a one-line error needs the headline."""
    return (str(exc).strip().splitlines() or [type(exc).__name__])[0]


def write_failure(exc: BaseException) -> str | None:
    """``"<path>: <reason>"`` if ``exc`` is a failed write (disk full, read-only, not a folder), else None.

    Besides ``OSError`` this recognises what safetensors raises for the same causes (its own error type
    carrying the OS error text), so a full disk while writing weights reads the same as anywhere else.
    """
    if isinstance(exc, OSError):
        where = f"{exc.filename}: " if exc.filename is not None else ""
        return f"{where}{exc.strerror or exc}"
    from safetensors import SafetensorError

    if isinstance(exc, SafetensorError) and "os error" in str(exc).lower():
        return " ".join(str(exc).split())
    if isinstance(exc, RuntimeError) and ("PytorchStreamWriter" in str(exc) or "unexpected pos" in str(exc)):
        return "torch.save could not finish writing (" + " ".join(str(exc).split())[:200] + ")"
    return None
