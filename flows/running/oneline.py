"""Failed task runs told in one line, and steps that never started not told. Prefect logs each
failed task run with its traceback, and for the errors this project raises on purpose (a provider's answer, the ledger or S3 away, a
stopped run, a budget reached) the message says it all. An S3 server gone mid-run printed about
250 lines of tracebacks for four items, burying the line that says what to do. `IMAGEGEN_DEBUG=1`
keeps them, and an error of any other type (a bug) keeps its traceback."""

from __future__ import annotations

import logging
import os

DEBUG = "IMAGEGEN_DEBUG"  # as the CLI's tracebacks (`flows.cli_errors`), which this layer does not import
TASK_RUNS = "prefect.task_runs"  # the logger of Prefect's task run engine
FLOW_RUNS = "prefect.flow_runs"  # and of its flow run engine
NOT_READY = "Finished in state NotReady("  # how it tells a task whose upstream task failed


def _told() -> tuple[type[BaseException], ...]:
    from botocore.exceptions import BotoCoreError, ClientError

    from blocks.errors import BlockMissing, LimiterError, ProviderError
    from flows.paying.archived import ArchivedImagesLost
    from flows.paying.budget import BudgetReached
    from flows.paying.ledger import LedgerConflict, LedgerUnavailable
    from flows.paying.owned import KeyTaken
    from flows.paying.paidcalls import PaidCallRefused

    return (ProviderError, LimiterError, BlockMissing, LedgerUnavailable, LedgerConflict, PaidCallRefused,
            BudgetReached, ArchivedImagesLost, KeyTaken, BotoCoreError, ClientError)


class OneLine(logging.Filter):
    """Drops the traceback of a record whose exception is one of `_told()`'s types, and the
    records of steps never started (`NOT_READY`)."""

    def __init__(self) -> None:
        super().__init__()
        self.told = _told()

    def filter(self, record: logging.LogRecord) -> bool:
        if record.exc_info and isinstance(record.exc_info[1], self.told):
            record.exc_info, record.exc_text = None, None
        # A step never started because the item's earlier step failed: that failure was told, and
        # the step's state shows in the UI; an ERROR line each (under a task name never given) was noise.
        return not (record.levelno == logging.ERROR and isinstance(record.msg, str)
                    and record.msg.startswith(NOT_READY))


def install() -> None:
    """Filter Prefect's task and flow run records in this process (once), unless `IMAGEGEN_DEBUG`
    is set (a flow run that failed on S3 printed its traceback too)."""
    for name in (TASK_RUNS, FLOW_RUNS):
        logger = logging.getLogger(name)
        if not os.environ.get(DEBUG) and not any(isinstance(f, OneLine) for f in logger.filters):
            logger.addFilter(OneLine())
