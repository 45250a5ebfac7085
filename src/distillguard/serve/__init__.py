"""The OpenAI-compatible HTTP surface and the backends behind it (a local transformers engine, an
upstream proxy, or a plugin's: ``serve/backend.py``). Knows nothing of the guard: the request
pipeline (``distillguard.pipeline``) and the app that composes both (``distillguard.app``) sit
above it."""
