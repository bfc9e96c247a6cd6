from __future__ import annotations

import dataclasses

from evolora.errors import ConfigError

METHODS: dict[str, type] = {}


def register(cls):
    METHODS[cls.name] = cls
    return cls


def _load_all() -> None:
    from evolora.methods import (ewc, lwf, multitask, olora, per_task_lora, replay,  # noqa: F401 (registers)
                                 seq_ft, seq_lora)


def method_class(name: str, source: str = "config"):
    _load_all()
    if name not in METHODS:
        raise ConfigError(f"{source}: method.name: unknown method {name!r} (known: {', '.join(sorted(METHODS))})")
    return METHODS[name]


def build_options(cls, options: dict, source: str = "config"):
    if cls.Options is None:
        if options:
            raise ConfigError(f"{source}: method.options: {cls.name} takes no options")
        return None
    fields = {f.name: f for f in dataclasses.fields(cls.Options)}
    for key in options:
        if key not in fields:
            raise ConfigError(f"{source}: method.options.{key!s}: unknown option for {cls.name} "
                              f"(options: {', '.join(fields)})")
    from pydantic import TypeAdapter, ValidationError

    try:
        return TypeAdapter(cls.Options).validate_python(options)
    except ValidationError as err:
        first = err.errors()[0]
        loc = ".".join(str(p) for p in first["loc"])
        where = f"method.options.{loc}" if loc else "method.options"
        raise ConfigError(f"{source}: {where}: {first['msg'].removeprefix('Value error, ')}") from None


def build_method(method_config, source: str = "config"):
    cls = method_class(method_config.name, source)
    return cls(build_options(cls, method_config.options, source))
