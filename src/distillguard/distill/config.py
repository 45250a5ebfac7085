"""The base of the distill stages' configs: pydantic models whose fields carry their help text.

One definition per setting serves the Python API, the pipeline's YAML and the CLI, which reads
each option's default and help from the field (``distillguard.cli.options``), so a default is
written once. Bad values raise :class:`~distillguard.errors.ConfigError` naming the setting as
its CLI flag (the YAML key is the same with underscores) and the fix.
"""

from __future__ import annotations

from typing import Annotated, Any

from pydantic import BaseModel, ConfigDict, ValidationError, WrapValidator

from distillguard.errors import ConfigError


def _keep_int(value: Any, handler) -> Any:
    # A run's fingerprint and a harvest request's body hash settings as given: `epochs: 1` and
    # `epochs: 1.0` were different runs before these configs were pydantic models, and converting
    # 1 to 1.0 would orphan their checkpoints (and resend a harvest's stored requests).
    if type(value) is int:
        return value
    return handler(value)


# A real number that keeps an int as given (see _keep_int); validated as a float otherwise.
Number = Annotated[float, WrapValidator(_keep_int)]


def flag(name: str) -> str:
    return "--" + name.replace("_", "-")


class DistillConfig(BaseModel):
    """Frozen (never mutate a config you were given: build another with :meth:`replace`), unknown
    settings refused, and validation errors raised as :class:`ConfigError`."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    def __init__(self, **data: Any) -> None:
        try:
            super().__init__(**data)
        except ValidationError as exc:
            raise ConfigError(_message(type(self), exc)) from None

    def replace(self, **changes: Any):
        """A copy with ``changes``, validated like a new config (``model_copy`` would skip that)."""
        return type(self)(**{**dict(self), **changes})


def _message(cls: type[BaseModel], exc: ValidationError) -> str:
    error = exc.errors(include_url=False)[0]
    name = str(error["loc"][0]) if error["loc"] else ""
    if error["type"] == "extra_forbidden":
        return (
            f"unknown setting {name!r} for {cls.__name__}; use one of "
            f"{', '.join(sorted(cls.model_fields))}"
        )
    if error["type"] == "missing":
        return f"{flag(name)} is required ({cls.model_fields[name].description})"
    return f"{flag(name)} {error['input']!r}: {error['msg'][0].lower()}{error['msg'][1:]}"
