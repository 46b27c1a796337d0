"""Errors shared by the engine and the server."""

from __future__ import annotations


class ParamError(ValueError):
    """A request parameter is invalid. `param` names it, so the server can fill in the
    `param` of OpenAI's error body; offline callers still see a plain ValueError."""

    def __init__(self, param: str, message: str) -> None:
        super().__init__(message)
        self.param = param


class EngineSleepingError(RuntimeError):
    """A request came while the engine sleeps (sleep mode): its memory is given back until
    wake_up(). The server answers 503."""
