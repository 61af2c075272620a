"""What stella-distill says while it works: one package logger, `-q`/`-v`, quiet third-party libraries.

Every module logs through ``get_logger(__name__)`` (a child of the ``stella_distill`` logger). Lines go
to the terminal as they are written, without prefixes: information on stdout, warnings on stderr (with
``warning:`` in front), so ``stella-distill check CONFIG > resolved.yaml`` keeps only the YAML. The
one-line error of a failed verb is printed by the CLI, not here.

``setup(verbosity)`` is what the CLI calls for ``-q`` (warnings only, no progress bars), the default
(our lines and bars; transformers, datasets, huggingface_hub and wandb quiet) and ``-v`` (our debug
lines, the libraries' own messages and progress bars such as transformers' "Loading weights").
Used as a library without ``setup``, stella-distill prints its own information lines and leaves the
other libraries as they are.

Standard library only: the CLI sets the libraries up before any of them is imported.
"""

from __future__ import annotations

import logging
import os
import sys

PACKAGE = "stella_distill"
QUIET, NORMAL, VERBOSE = -1, 0, 1

# Environment switches the libraries read when they are imported (a value the user set wins).
_QUIET_LIBRARIES = {
    "HF_HUB_DISABLE_PROGRESS_BARS": "1",  # huggingface_hub, and transformers' "Loading weights" bars
    "HF_DATASETS_DISABLE_PROGRESS_BARS": "1",
    "TRANSFORMERS_VERBOSITY": "error",
    "DATASETS_VERBOSITY": "error",
    "TRANSFORMERS_NO_ADVISORY_WARNINGS": "1",
    "WANDB_SILENT": "true",
}
_LIBRARY_LOGGERS = ("accelerate", "sentence_transformers", "huggingface_hub", "urllib3", "filelock")

_verbosity = NORMAL


class _Console(logging.Handler):
    """Information to stdout, warnings and errors to stderr; the streams are looked up at every line
    (pytest's capture and other redirections replace ``sys.stdout`` after import)."""

    def emit(self, record: logging.LogRecord) -> None:
        try:
            text = self.format(record)
            if record.levelno >= logging.WARNING:
                stream, text = sys.stderr, f"warning: {text}"
            else:
                stream = sys.stdout
            stream.write(text + "\n")
            stream.flush()
        except Exception:
            self.handleError(record)


class _FirstRankOnly(logging.Filter):
    """Under torchrun / ``accelerate launch`` every process loads the config; one copy of each line is
    enough. Errors always pass."""

    def filter(self, record: logging.LogRecord) -> bool:
        return record.levelno >= logging.ERROR or os.environ.get("RANK", "0") in ("", "0")


def _package_logger() -> logging.Logger:
    root = logging.getLogger(PACKAGE)
    if not any(isinstance(h, _Console) for h in root.handlers):
        handler = _Console()
        handler.setFormatter(logging.Formatter("%(message)s"))
        handler.addFilter(_FirstRankOnly())
        root.addHandler(handler)
        root.setLevel(logging.INFO)
        root.propagate = False  # an application's own root handler would print every line twice
    return root


def get_logger(name: str) -> logging.Logger:
    """The logger of module ``name`` (``stella_distill.<module>``), printing through the package's handler."""
    _package_logger()
    return logging.getLogger(name)


def setup(verbosity: int = NORMAL) -> None:
    """Set how much every part of a run says: ``QUIET`` (-q), ``NORMAL`` or ``VERBOSE`` (-v).

    Call it before transformers, datasets or huggingface_hub are imported: they read their progress-bar
    and verbosity switches from the environment then (libraries already imported are set directly).
    Environment values the user set are kept.
    """
    global _verbosity
    _verbosity = verbosity
    level = {QUIET: logging.WARNING, NORMAL: logging.INFO, VERBOSE: logging.DEBUG}[verbosity]
    _package_logger().setLevel(level)
    if verbosity >= VERBOSE:
        os.environ.setdefault("TRANSFORMERS_VERBOSITY", "info")
        for name in _LIBRARY_LOGGERS:
            logging.getLogger(name).setLevel(logging.INFO)
        return
    for key, value in _QUIET_LIBRARIES.items():
        os.environ.setdefault(key, value)
    for name in _LIBRARY_LOGGERS:
        logging.getLogger(name).setLevel(logging.ERROR)
    _quiet_imported_libraries()


def _quiet_imported_libraries() -> None:
    if "huggingface_hub" in sys.modules and os.environ["HF_HUB_DISABLE_PROGRESS_BARS"] == "1":
        from huggingface_hub.utils import disable_progress_bars

        disable_progress_bars()
    if "transformers" in sys.modules:
        from transformers.utils import logging as hf_logging

        if os.environ["TRANSFORMERS_VERBOSITY"] == "error":
            hf_logging.set_verbosity_error()
        if os.environ["HF_HUB_DISABLE_PROGRESS_BARS"] == "1":
            hf_logging.disable_progress_bar()
    if "datasets" in sys.modules:
        import datasets

        if os.environ["DATASETS_VERBOSITY"] == "error":
            datasets.logging.set_verbosity_error()
        if os.environ["HF_DATASETS_DISABLE_PROGRESS_BARS"] == "1":
            datasets.disable_progress_bars()


def show_progress() -> bool:
    """Whether our own progress bars may show (not under ``-q``; ``logging.progress`` decides too)."""
    return _verbosity > QUIET
