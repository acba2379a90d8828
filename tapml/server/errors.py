"""Errors as the OpenAI API shapes them: a status and {"error": {message, type, param, code}}."""

from __future__ import annotations

from typing import Any

# the error types of OpenAI's API, by status
_TYPES = {
    400: "invalid_request_error",
    401: "invalid_request_error",
    404: "invalid_request_error",
    405: "invalid_request_error",
    413: "invalid_request_error",
    415: "invalid_request_error",
    422: "invalid_output_error",
    429: "requests",
    500: "server_error",
    503: "server_error",
}


class ApiError(Exception):
    """A request's failure, answered with `status` and an OpenAI-shaped body."""

    def __init__(self, status: int, message: str, param: str | None = None,
                 code: str | None = None):  # fmt: skip
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": _TYPES.get(self.status, "error"),
                          "param": self.param, "code": self.code}}  # fmt: skip


def bad_field(param: str, message: str, code: str = "invalid_value") -> ApiError:
    """A 400 naming the request field at fault."""
    return ApiError(400, f"{param}: {message}", param=param, code=code)
