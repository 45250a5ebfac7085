"""Typer options built from a config model's fields, so a default and its help are written once."""

from __future__ import annotations

from typing import Any

import typer
from pydantic import BaseModel


def option(model: type[BaseModel], name: str, *param_decls: str, **kwargs: Any) -> Any:
    """``typer.Option`` with the default and help of ``model``'s field ``name`` (required when the
    field is); ``param_decls`` and ``kwargs`` as typer's, e.g. ``"--resume/--no-resume"``."""
    field = model.model_fields[name]
    default = ... if field.is_required() else field.get_default(call_default_factory=True)
    kwargs.setdefault("help", field.description)
    return typer.Option(default, *param_decls, **kwargs)


def seconds_or_off(value: str | float | None) -> float | None:
    """Typer ``parser`` of a duration option that can be switched off: positive seconds, or
    ``off`` (None)."""
    if value is None or (isinstance(value, str) and value.strip().lower() == "off"):
        return None
    try:
        seconds = float(value)
    except ValueError:
        raise typer.BadParameter(f"{value!r}: give seconds (43200 is 12 h) or 'off'") from None
    if not seconds > 0:  # also NaN
        raise typer.BadParameter(
            f"{value!r}: give a positive number of seconds (43200 is 12 h), or 'off' for none"
        )
    return seconds
