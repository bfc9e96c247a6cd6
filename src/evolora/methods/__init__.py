from evolora.methods.base import Method, StepInputs
from evolora.methods.build import build_method, method_class, spelled_out
from evolora.methods.registry import METHODS, register


def validate_method_options(method_config, source: str = "config") -> None:
    build_method(method_config, source)


__all__ = ["Method", "StepInputs", "METHODS", "build_method", "method_class", "register", "spelled_out",
           "validate_method_options"]
