"""The one exception type that reaches the user as a one-line error instead of a traceback."""


class UserError(Exception):
    """A problem with the user's input (config, dataset, model file, flags).

    The message is shown as-is on one line, prefixed with ``error:``; it must name the file and
    the field or line at fault. The CLI exits with ``exit_code`` (1 unless stated).
    """

    def __init__(self, message: str, exit_code: int = 1) -> None:
        super().__init__(message)
        self.exit_code = exit_code
