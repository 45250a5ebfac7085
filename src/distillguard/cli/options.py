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
