"""Where methods and add-ons register themselves: `@register` / `@register_addon` on the class. Imports no
method (`evolora.methods.build` imports them all and builds one from its config)."""

from __future__ import annotations

METHODS: dict[str, type] = {}
ADDONS: dict[str, type] = {}


def register(cls):
    METHODS[cls.name] = cls
    return cls


def register_addon(cls):
    ADDONS[cls.name] = cls
    return cls
