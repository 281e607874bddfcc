"""Black Forest Labs' task API as an HTTP client (``BflClient``), for the BFL engine.

The API key goes only into the ``x-key`` header of requests to BFL's own hosts (the base
URL's host and its sibling regional hosts); it is never logged, stored or returned.
"""

from __future__ import annotations

from typing import Any

import httpx

from kontext_server.worker.engine import JobFailed

__all__ = ["BflClient", "Retryable", "UpstreamFailure", "error_detail"]

_DETAIL_MAX_CHARS = 300


class UpstreamFailure(JobFailed):
    """Ends a job as failed (BFL's answer, or what became of it); by default as
    ``internal_error``: BFL failed, the caller's input was fine."""


class Retryable(Exception):
    """An upstream answer worth trying again (429, 5xx, network). ``retry_after_s``: BFL's."""

    def __init__(self, message: str, retry_after_s: float | None = None) -> None:
        super().__init__(message)
        self.retry_after_s = retry_after_s


def _shorten(text: str) -> str:
    return text if len(text) <= _DETAIL_MAX_CHARS else text[: _DETAIL_MAX_CHARS - 3] + "..."


def _detail(response: httpx.Response) -> str:
    return _shorten(response.text.strip().replace("\n", " "))


def error_detail(answer: dict[str, Any]) -> str:
    """``": <what BFL said>"`` about a task in status ``Error`` (or nothing)."""
    for key in ("details", "detail", "error", "result"):
        value = answer.get(key)
        if value:
            return ": " + _shorten(str(value))
    return ""


def _retry_after_s(response: httpx.Response) -> float | None:
    try:
        return max(0.0, float(response.headers.get("retry-after", "")))
    except ValueError:
        return None


class BflClient:
    """BFL's task API: ``submit`` (``POST /v1/{model}``) and ``poll`` (``GET polling_url``).

    Raises ``Retryable`` for 429, 5xx and network errors, ``UpstreamFailure`` for answers
    that another try would not change (bad key, no credits, a rejected request). ``transport``
    exists for tests."""

    def __init__(
        self,
        base_url: str,
        api_key: str,
        *,
        timeout_s: float = 30.0,
        transport: httpx.BaseTransport | None = None,
    ) -> None:
        self.base_url = base_url.rstrip("/")
        self._api_key = api_key
        self._key_hosts = _key_hosts(httpx.URL(self.base_url).host)
        self._http = httpx.Client(timeout=timeout_s, transport=transport, follow_redirects=False)

    def close(self) -> None:
        self._http.close()

    def submit(self, model: str, body: dict[str, Any]) -> dict[str, Any]:
        """``{id, polling_url}`` of a new (paid) task."""
        answer = self._send("POST", f"{self.base_url}/v1/{model}", json=body)
        if not isinstance(answer.get("id"), str):
            raise UpstreamFailure(
                f"Black Forest Labs answered a submit without a task id: {answer}"
            )
        return answer

    def poll(self, polling_url: str) -> dict[str, Any]:
        """``{id, status, result, progress}``; a 404 reads as status ``Task not found``."""
        return self._send("GET", polling_url)

    def polling_url_for(self, task_id: str) -> str:
        return f"{self.base_url}/v1/get_result?id={task_id}"

    def _send(self, method: str, url: str, json: Any = None) -> dict[str, Any]:
        target = httpx.URL(url)
        if not _host_matches(target.host, self._key_hosts):
            # Never hand the key to a host that is not BFL's.
            raise UpstreamFailure(
                f"Black Forest Labs returned a polling URL on host {target.host!r}, which is not"
                f" the configured BFL host ({httpx.URL(self.base_url).host}) or one of its"
                " regional hosts; refusing to send the API key there"
            )
        headers = {"x-key": self._api_key, "accept": "application/json"}
        try:
            response = self._http.request(method, target, json=json, headers=headers)
        except httpx.TransportError as exc:
            raise Retryable(f"network error talking to Black Forest Labs: {exc}") from exc
        return self._answer(response)

    @staticmethod
    def _answer(response: httpx.Response) -> dict[str, Any]:
        code = response.status_code
        if code == 429 or code >= 500:
            raise Retryable(
                f"Black Forest Labs answered {code}: {_detail(response)}", _retry_after_s(response)
            )
        if code == 404:
            return {"status": "Task not found"}
        if code in (401, 403):
            raise UpstreamFailure(
                f"Black Forest Labs refused the API key ({code}); the operator must check"
                " KONTEXT_BFL_API_KEY"
            )
        if code == 402:
            raise UpstreamFailure(
                "Black Forest Labs refused the task: the account has no credits left (402)"
            )
        if code >= 400:
            raise UpstreamFailure(
                f"Black Forest Labs rejected the request ({code}): {_detail(response)}",
                "bad_request",
            )
        try:
            body = response.json()
        except ValueError as exc:
            raise Retryable(f"Black Forest Labs answered {code} with non-JSON") from exc
        if not isinstance(body, dict):
            raise Retryable(f"Black Forest Labs answered {code} with {type(body).__name__}")
        return body


def _key_hosts(base_host: str) -> tuple[str, ...]:
    """The base URL's host, plus its parent domain for regional hosts (api.eu1.bfl.ai for
    api.bfl.ai). An IP address or a one-label host matches only itself."""
    labels = base_host.split(".")
    if len(labels) < 3 or base_host.replace(".", "").isdigit():
        return (base_host,)
    return (base_host, "." + ".".join(labels[-2:]))


def _host_matches(host: str, allowed: tuple[str, ...]) -> bool:
    return host == allowed[0] or any(host.endswith(suffix) for suffix in allowed[1:])
