"""Guard gateway: API keys, ledger, rate limits and quotas, policies, metrics."""
