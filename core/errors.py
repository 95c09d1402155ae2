class QtuneError(Exception):
    """A problem the user can fix. The CLI prints it as one line and exits non-zero."""

    exit_code = 2


class ConfigError(QtuneError):
    """The config (or a --set override) is invalid."""


def first_line(error: BaseException) -> str:
    """The first line of an exception's message (library messages run to many lines), or the name
    of its type when the message is empty: what a one-line error quotes of its cause."""
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__


def describe(error: BaseException) -> str:
    """``TypeName: first line of the message``, or ``TypeName`` alone when there is no message: a
    plugin's exception named in a one-line error."""
    name = type(error).__name__
    return f"{name}: {first_line(error)}" if str(error).strip() else name
