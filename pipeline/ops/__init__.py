"""What an operator sees: the /metrics, /healthz and /readyz server, metrics and logs."""
