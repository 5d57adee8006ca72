"""One exception type for problems the user can fix; the CLI prints it as one line and exits with status 2."""


class MergeEditError(Exception):
    """Bad input or an unusable environment: the message names what, where, and the fix."""

    exit_code = 2
