"""One exception type for problems the user can fix; the CLI prints it as one line and exits with status 2."""

_CONTROL = {i: f"\\x{i:02x}" for i in range(32)} | {10: "\\n", 13: "\\r", 9: "\\t", 127: "\\x7f"}


class MergeEditError(Exception):
    """Bad input or an unusable environment: the message names what, where, and the fix.

    Control characters are escaped, so a tensor name or YAML key holding a newline cannot split the one-line message.
    """

    exit_code = 2

    def __init__(self, message: str = "") -> None:
        super().__init__(str(message).translate(_CONTROL))
