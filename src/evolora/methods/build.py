"""Builds a method from its config section: every method module is imported here (each registers itself),
and the options are validated against the method's options dataclass, with its named variants."""

from __future__ import annotations

import dataclasses
import json

from evolora.errors import ConfigError
from evolora.methods import (cmoe, ewc, gere, lwf, moe_cl, multitask, olora,  # noqa: F401  (they register)
                             per_task_lora, replay, seq_ft, seq_lora)
from evolora.methods.registry import ADDONS, METHODS


def _load_all() -> None:
    """Every built-in method is registered once this module is imported (kept for callers that ask)."""


def method_class(name: str, source: str = "config"):
    _load_all()
    if name not in METHODS:
        raise ConfigError(f"{source}: method.name: unknown method {name!r} (known: {', '.join(sorted(METHODS))})")
    return METHODS[name]


def build_options(cls, options: dict, source: str = "config", section: str = "method.options"):
    if cls.Options is None:
        if options:
            raise ConfigError(f"{source}: {section}: {cls.name} takes no options")
        return None
    if not isinstance(options, dict):
        raise ConfigError(f"{source}: {section}: expected a mapping of options, got {options!r}")
    fields = {f.name: f for f in dataclasses.fields(cls.Options)}
    variants = getattr(cls.Options, "VARIANTS", {})
    if "variant" in fields and options.get("variant") is not None:
        if options["variant"] not in variants:
            raise ConfigError(f"{source}: {section}.variant: unknown variant {str(options['variant'])[:80]!r} for "
                              f"{cls.name} (known: {', '.join(variants)})")
        options = {**variants[options["variant"]], **options}  # options given beside the variant win
    for key in options:
        if key not in fields:
            raise ConfigError(f"{source}: {section}.{key!s}: unknown option for {cls.name} "
                              f"(options: {', '.join(fields)})")
    from pydantic import TypeAdapter, ValidationError

    try:
        return TypeAdapter(cls.Options).validate_python(options)
    except ValidationError as err:
        first = err.errors()[0]
        loc = ".".join(str(p) for p in first["loc"])
        where = f"{section}.{loc}" if loc else section
        raise ConfigError(f"{source}: {where}: {first['msg'].removeprefix('Value error, ')}") from None


def build_method(method_config, source: str = "config"):
    cls = method_class(method_config.name, source)
    method = cls(build_options(cls, method_config.options, source))
    if not method_config.addons:
        return method
    from evolora.methods.addons import WithAddOns

    addons = []
    for name, options in method_config.addons.items():
        addon_cls = addon_class(name, source)
        addons.append(addon_cls(build_options(addon_cls, options or {}, source, f"method.addons.{name}")))
    return WithAddOns(method, addons)


def addon_class(name: str, source: str = "config"):
    if name not in ADDONS:
        raise ConfigError(f"{source}: method.addons.{name}: unknown add-on (known: {', '.join(sorted(ADDONS))})")
    return ADDONS[name]


def spelled_out(config, source: str = "config"):
    """The run config with its method section's options spelled out: every option of the method and of each
    add-on, defaults filled in and variants expanded. A run folder keeps this form, so that a resume or a
    re-evaluation under a later evolora with other defaults runs what the run ran (or is refused by name)."""
    def plain(cls, options, section):
        built = build_options(cls, options or {}, source, section)
        return json.loads(json.dumps(dataclasses.asdict(built))) if built is not None else {}

    method = config.method
    addons = {name: plain(addon_class(name, source), options, f"method.addons.{name}")
              for name, options in method.addons.items()}
    section = method.model_copy(update={"options": plain(method_class(method.name, source), method.options,
                                                         "method.options"), "addons": addons})
    return config.model_copy(update={"method": section})
