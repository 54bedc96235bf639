"""Paying once: the ledger in S3 (`ledger`, `journal`), the one owner of every paid step
(`paystep`), the date's claim (`claim`, `owner`, `owned`), the providers' limits taken on the
Prefect server (`slots`, `slotapi`, `leases`, `paidcalls`, `detach`), the budget on charges and
what the date's earlier runs spent (`budget`, `spent`), what the archive already holds
(`archived`), callbacks and wake-ups (`callbacks`, `wakeup`), and the fault points the tests
stop a step at (`faults`).

Imports `flows.specs` and `flows.models` only."""
