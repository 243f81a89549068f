"""What every Prefect task of every recipe shares: the retry condition and the run logger."""

from __future__ import annotations

import logging
from typing import Any

log = logging.getLogger("tasks")


def run_logger() -> Any:
    from prefect import get_run_logger

    try:
        return get_run_logger()
    except Exception:  # outside a flow run (task.fn in unit tests)
        return log


def retry_unless_bad_input(task: Any, task_run: Any, state: Any) -> bool:
    """Prefect retry condition: bad input (infra.config.BadInputError) fails the same way every time, and an
    exception that says so (`no_retry = True`, e.g. a pruned sweep trial) is final too."""
    from infra.config import BadInputError

    err = getattr(state, "data", None)
    return not isinstance(err, BadInputError) and not getattr(err, "no_retry", False)
