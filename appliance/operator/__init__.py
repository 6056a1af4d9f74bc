"""What the operator sees: Prometheus metrics, the /metrics endpoint, section QC reports, the status line."""
