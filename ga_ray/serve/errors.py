"""OpenAI-style errors: every HTTP error the serve app sends has the body
`{"error": {"message", "type", "param", "code"}}` that the `openai` client parses."""

from __future__ import annotations

from typing import Any

_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    404: "not_found_error",
    409: "conflict_error",
    413: "invalid_request_error",
    429: "rate_limit_error",
    500: "server_error",
    503: "service_unavailable",
}


class ApiError(Exception):
    """An HTTP error with an OpenAI-style body; `param` names the request field at fault."""

    def __init__(self, status: int, message: str, *, param: str | None = None, code: str | None = None,
                 headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status = int(status)
        self.message = message
        self.param = param
        self.code = code
        self.headers = dict(headers or {})

    @property
    def type(self) -> str:
        return _TYPES.get(self.status, "server_error" if self.status >= 500 else "invalid_request_error")

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


def bad_request(message: str, param: str | None = None, code: str = "invalid_value") -> ApiError:
    return ApiError(400, message, param=param, code=code)


def unknown_model(model: str, known: list[str]) -> ApiError:
    shown = ", ".join(known[:10]) + (f", ... ({len(known)} in all)" if len(known) > 10 else "")
    return ApiError(404, f"The model {model!r} does not exist on this server; GET /v1/models lists them ({shown})",
                    param="model", code="model_not_found")


def overloaded(retry_after_s: int, why: str = "the server is at capacity (its request queue is full)") -> ApiError:
    return ApiError(503, f"{why}; retry after {retry_after_s} s", code="overloaded",
                    headers={"Retry-After": str(int(retry_after_s))})
