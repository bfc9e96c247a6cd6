class EvoloraError(Exception):
    """An error caused by the user's input; the CLI prints it as one line, without a traceback."""

    def __init__(self, message: str):
        # Always one line, whatever text (a key with a newline, a library's message) went into it.
        super().__init__(" ".join(str(message).split()))


class ConfigError(EvoloraError):
    pass


class DataError(EvoloraError):
    pass
