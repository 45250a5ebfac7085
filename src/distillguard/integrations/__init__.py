"""distillguard inside other serving engines.

``vllm``          a vLLM v1 logits processor that embeds each account's watermark (issue 26);
                  imports vLLM, so it is loaded inside vLLM's own environment only.
``rows``          the plugin's batch state and its step, free of vLLM so both environments can
                  test it.

What the gateway sends per request (``vllm_xargs``) and the plugin reads back is
``serve/keymaterial.py``: the gateway's upstream backend writes it, and this package sits above
``serve`` and ``watermark``, never below.

Nothing here imports the gateway (fastapi, pydantic-settings, the guard): vLLM pins its own
versions of those, and the plugin is installed into vLLM's environment with ``--no-deps``
(``scripts/vllm_env.sh``).
"""
