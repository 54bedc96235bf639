"""Failed task runs told in one line; steps never started, and task runs completed, not told.

Prefect logs each failed task run with its traceback, and for the errors this project raises on
purpose (a provider's answer, the ledger or S3 away, a stopped run, a budget reached) the
message says it all: an S3 server gone mid-run printed about 250 lines of tracebacks for four
items, burying the line that says what to do. It also logs `Finished in state Completed()` at
INFO for every task run, three to five lines an item that buried the lines a person reads (a
job accepted, the progress, the manifest) and cost about 2 ms of CPU each (the console's
formatting and the record's trip to the API); the task runs' states show in the UI, and the
progress line counts the items. `IMAGEGEN_DEBUG=1` keeps every record, and an error of any other
type (a bug) keeps its traceback.

A flow that ends Failed on an error a person acts on (a refused spec, a budget, a backfill's
dates) says it in one line and marks it `told`; Prefect's engine then raised it again in a
deployment's run and logged "Engine execution exited with unexpected exception" with its
traceback, in the run's logs and the worker's terminal. That record is dropped; where the
engine refused the flow's parameters, which nothing told in the run's logs, it becomes the
refusal's one line."""

from __future__ import annotations

import logging
import os

DEBUG = "IMAGEGEN_DEBUG"  # as the CLI's tracebacks (`flows.cli_errors`), which this layer does not import
TASK_RUNS = "prefect.task_runs"  # the logger of Prefect's task run engine
FLOW_RUNS = "prefect.flow_runs"  # and of its flow run engine
NOT_READY = "Finished in state NotReady("  # how it tells a task whose upstream task failed
COMPLETED = "Finished in state Completed("  # and a task run that completed
ENGINE_EXIT = "Engine execution exited with unexpected exception"  # a flow run's outcome raised again
TOLD = "_imagegen_told_in_one_line"  # the mark `told()` leaves on an exception


def told(exc: BaseException) -> BaseException:
    """`exc`, marked as said in one line in the flow run's log (its Failed state's data)."""
    setattr(exc, TOLD, True)
    return exc


def _told() -> tuple[type[BaseException], ...]:
    from botocore.exceptions import BotoCoreError, ClientError

    from blocks.errors import BlockMissing, LimiterError, ProviderError
    from flows.paying.archived import ArchivedImagesLost
    from flows.paying.budget import BudgetReached
    from flows.paying.ledger import LedgerConflict, LedgerUnavailable
    from flows.paying.owned import KeyTaken
    from flows.paying.paidcalls import PaidCallRefused
    from prefect.exceptions import ParameterTypeError

    return (ProviderError, LimiterError, BlockMissing, LedgerUnavailable, LedgerConflict, PaidCallRefused,
            BudgetReached, ArchivedImagesLost, KeyTaken, BotoCoreError, ClientError, ParameterTypeError)


class OneLine(logging.Filter):
    """Drops the traceback of a record whose exception is one of `_told()`'s types or marked
    `told`, the engine's record of such an exception raised again (`ENGINE_EXIT`), the records
    of steps never started (`NOT_READY`) and those of task runs completed (`COMPLETED`)."""

    def __init__(self) -> None:
        super().__init__()
        self.told = _told()

    def filter(self, record: logging.LogRecord) -> bool:
        exc = record.exc_info[1] if record.exc_info else None
        if exc is not None and (isinstance(exc, self.told) or getattr(exc, TOLD, False)):
            if isinstance(record.msg, str) and record.msg.startswith(ENGINE_EXIT):
                if getattr(exc, TOLD, False):
                    return False  # the flow said it in one line already
                record.msg, record.args = f"{type(exc).__name__}: {exc}", ()  # its parameters, refused
            record.exc_info, record.exc_text = None, None
        if not isinstance(record.msg, str):
            return True
        if record.levelno == logging.INFO:  # a task run completed: its state shows in the UI
            return not (record.name == TASK_RUNS and record.msg.startswith(COMPLETED))
        # A step never started because the item's earlier step failed: that failure was told, and
        # the step's state shows in the UI; an ERROR line each (under a task name never given) was noise.
        return not (record.levelno == logging.ERROR and record.msg.startswith(NOT_READY))


def install() -> None:
    """Filter Prefect's task and flow run records in this process (once), unless `IMAGEGEN_DEBUG`
    is set (a flow run that failed on S3 printed its traceback too)."""
    for name in (TASK_RUNS, FLOW_RUNS):
        logger = logging.getLogger(name)
        if not os.environ.get(DEBUG) and not any(isinstance(f, OneLine) for f in logger.filters):
            logger.addFilter(OneLine())
