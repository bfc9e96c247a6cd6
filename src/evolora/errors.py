class EvoloraError(Exception):
    """An error caused by the user's input; the CLI prints it as one line, without a traceback."""


class ConfigError(EvoloraError):
    pass


class DataError(EvoloraError):
    pass
