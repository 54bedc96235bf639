"""Deployment-side setup: provider limits as code (`limits.yaml`, `limits.py`) applied to a
Prefect server, so they hold across processes and machines; the servers this project starts
(`server.py`, `postgres.py`, `processes.py`); and two modules every Prefect server of this
environment loads for its SQLite database: `sqlite_cursors.py` keeps it answering while the
database is busy, `sqlite_slots.py` keeps its slot calls from being refused beside other writes."""
