"""The one exception type the CLI and server turn into a one-line message (exit code 2 / HTTP 4xx).

Raise OpenClawError for anything the user can fix (bad path, bad flag, unsupported checkpoint); let real
bugs raise their own exceptions so they keep their tracebacks.
"""


class OpenClawError(Exception):
    """A problem with the user's input: the message says what is wrong and what to do."""
