"""Test hook: make the model step fail on purpose, so that fault handling (error events,
/health, the server exiting non-zero) can be tested end to end, in a subprocess too.

PAGEDSERVE_TEST_FAIL_STEP_AFTER=N: after N successful model steps, every further step raises
RuntimeError. Not for production use; unset, it costs nothing."""

from __future__ import annotations

import logging
import os
from typing import Any, Callable

logger = logging.getLogger("pagedserve")

ENV_VAR = "PAGEDSERVE_TEST_FAIL_STEP_AFTER"


class InjectedStepFailure(RuntimeError):
    pass


def maybe_inject_step_failure(runner: Any) -> None:
    """Wrap `runner.launch` to fail after the number of steps the environment names."""
    value = os.environ.get(ENV_VAR)
    if not value:
        return
    budget = int(value)
    real: Callable[..., Any] = runner.launch
    done = 0

    def launch(*args: Any, **kwargs: Any) -> Any:
        nonlocal done
        if done >= budget:
            raise InjectedStepFailure(f"{ENV_VAR}={budget}: injected model step failure")
        done += 1
        return real(*args, **kwargs)

    runner.launch = launch
    logger.warning("%s=%d is set: the model step will fail after %d steps (test hook)", ENV_VAR, budget, budget)
