"""A run's parts: the Prefect tasks a person sees in the UI (`tasks`), progress while it runs
(`progress`), its manifest and report (`report`), letting go of ended items and keeping their
outcomes for the manifest (`settle`), and failed task runs in one line (`oneline`).

Imports the layers below: `flows.specs`, `flows.models`, `flows.paying`, `flows.imaging`."""
