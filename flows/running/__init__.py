"""A run's parts: the Prefect tasks a person sees in the UI (`tasks`), progress while it runs
(`progress`) and its manifest and report (`report`).

Imports the layers below: `flows.specs`, `flows.models`, `flows.paying`, `flows.imaging`."""
