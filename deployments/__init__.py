"""Deployment-side setup: provider limits as code (`limits.yaml`, `limits.py`) applied to a
Prefect server, so they hold across processes and machines."""
