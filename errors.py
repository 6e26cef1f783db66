"""The one exception type of problems a user can fix, in a module that imports nothing heavy.

config.py and cli.py raise and catch it while reading the command line, before torch loads (seconds), so that
``--help`` and a bad argument answer at once; common.py and the rest of the library subclass it."""
from __future__ import annotations


class UserError(Exception):
    """A problem the user can fix (a bad config value, a missing file); the message says how. The command
    line prints it as one line, without a traceback."""
