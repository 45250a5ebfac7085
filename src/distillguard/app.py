"""The gateway app: the OpenAI-compatible surface (``serve``) with the guard (``guard``) in front of
its backend, joined by the request pipeline (``distillguard.pipeline``).

It lives above both so that neither imports the other: ``serve`` knows routes and backends,
``guard`` knows keys, limits, verdicts and the ledger.
"""

from __future__ import annotations

from fastapi import FastAPI, Request
from fastapi.responses import Response

from distillguard.guard.admin import admin_router
from distillguard.guard.auth import PermissionDenied
from distillguard.guard.gateway import Guard
from distillguard.pipeline import Pipeline
from distillguard.serve import app as http
from distillguard.serve.backend import Backend
from distillguard.serve.config import ServeConfig
from distillguard.serve.schemas import validation_to_api_error


def visible_models(guard: Guard):
    """The caller's key (401 without a valid one) and the models it may see."""

    async def visible(request: Request):
        return (await guard.auth.authenticate(request)).allows

    return visible


def create_app(backend: Backend, config: ServeConfig, guard: Guard | None = None) -> FastAPI:
    """The API app over ``backend``; ``guard`` None serves it with no keys, limits, ledger or
    metrics (``distillguard serve --no-guard``)."""
    if guard is None:
        return http.create_app(backend, config, Pipeline.unguarded(backend), score_prompts=True)
    app = http.create_app(
        backend,
        config,
        Pipeline.guarded(guard, backend),
        health=guard.recorder.unavailable,
        services=[guard],
        visible=visible_models(guard),
    )
    app.include_router(admin_router(guard, validation_to_api_error))

    @app.get("/metrics")
    async def metrics(request: Request):
        # Request counts, statuses and (with account labels) who uses the service: the
        # operator's, so behind the admin key unless --metrics-auth none.
        if guard.config.metrics_auth == "admin" and not guard.auth.is_admin(request):
            if guard.config.admin_key is None:
                raise PermissionDenied(
                    "/metrics needs the admin key and the server has none: set "
                    "DISTILLGUARD_ADMIN_KEY, or serve with --metrics-auth none",
                    code="admin_disabled",
                )
            await guard.auth.authenticate(request)  # 401 for a missing or unknown key
            raise PermissionDenied(
                "/metrics needs the admin key (or serve with --metrics-auth none)",
                code="admin_only",
            )
        return Response(guard.metrics.render(), media_type=guard.metrics.content_type)

    return app


__all__ = ["create_app"]
