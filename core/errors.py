class QtuneError(Exception):
    """A problem the user can fix. The CLI prints it as one line and exits non-zero."""

    exit_code = 2


class ConfigError(QtuneError):
    """The config (or a --set override) is invalid."""
