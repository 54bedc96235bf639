"""Deployment-side setup: provider limits as code (`limits.yaml`, `limits.py`) applied to a
Prefect server, so they hold across processes and machines; the servers this project starts
(`server.py`, `postgres.py`, `processes.py`); and `sqlite_cursors.py`, which every Prefect
server of this environment loads to keep answering while its SQLite database is busy."""
