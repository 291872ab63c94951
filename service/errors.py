"""Request errors: a status, a machine-readable reason, and a message a caller can act on."""

from __future__ import annotations

__all__ = ["RequestError"]


class RequestError(Exception):
    """A client error (4xx). ``reason`` labels the rejection metric."""

    def __init__(self, status: int, reason: str, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.reason = reason
        self.message = message

    def to_json(self) -> dict[str, object]:
        return {"error": self.message, "reason": self.reason, "status": self.status}
