"""The one exception type for user mistakes; the CLI prints its message and exits 2."""


class UserError(Exception):
    """Bad input (config, file, cache, checkpoint) that the user must fix.

    The message names the file and line or the config field. The CLI prints it on one line,
    without a traceback, and exits with code 2.
    """
