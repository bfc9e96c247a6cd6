class EvoloraError(Exception):
    """An error caused by the user's input; the CLI prints it as one line, without a traceback."""

    LIMIT = 300

    def __init__(self, message: str):
        # Always one bounded line, whatever text (a key with a newline, a library's message, a huge value)
        # went into it: the middle of an over-long message gives way, its start and end name the problem.
        text = " ".join(str(message).split())
        if len(text) > self.LIMIT:
            text = text[:200] + " … " + text[-(self.LIMIT - 203):]
        super().__init__(text)


def shown(value, limit: int = 120) -> str:
    """repr of a bad value for a message, cut to `limit` characters."""
    text = repr(value)
    return text if len(text) <= limit else text[:limit - 1] + "…"


class ConfigError(EvoloraError):
    pass


class DataError(EvoloraError):
    pass
