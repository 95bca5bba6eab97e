"""Talking to a running daemon: the REST client behind ``meshd chat``, ``query`` and ``status``.

Plain aiohttp against the daemon's own OpenAI-compatible API, so what these commands show is
exactly what any other client gets. Errors are turned into sentences a user can act on: an
unreachable daemon says how to check on it, an API error carries the daemon's message.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

import aiohttp

from meshd.client import default_peer

UNREACHABLE_HINT = "is `meshd serve` running? try `systemctl status meshd`"


def normalise_url(url: str) -> str:
    """Accept ``host:port`` and ``http://host:port/`` alike."""
    url = url.strip().rstrip("/")
    if "://" not in url:
        url = "http://" + url
    return url


class ClientError(Exception):
    """Something the user should read: the daemon is unreachable or refused the request."""


class DaemonUnreachable(ClientError):
    """No answer at all: the daemon is not running, not reachable from here, or too slow."""


class RequestFailed(ClientError):
    """The daemon answered with an error: it refused the request (``status`` >= 400, the body being
    the server's ``meshd.serve.apischema.ApiError``) or failed it mid-stream (``status`` 200)."""

    def __init__(self, status: int, message: str, code: str | None = None):
        prefix = f"the daemon answered {status}" if status >= 400 else "the daemon failed mid-answer"
        super().__init__(f"{prefix}: {message}")
        self.status, self.message, self.code = status, message, code


@dataclass
class Reply:
    """One finished completion: its text, why it stopped, and the ``meshd`` statistics."""

    text: str = ""
    finish_reason: str | None = None
    usage: dict[str, int] = field(default_factory=dict)
    stats: dict[str, Any] = field(default_factory=dict)

    def as_generate_json(self) -> dict[str, Any]:
        """The fields ``meshd generate --json`` prints, so scripts can use either command."""
        st = self.stats
        return {
            "text": self.text,
            "token_ids": st.get("token_ids", []),
            "new_tokens": st.get("new_tokens", 0),
            "rounds": st.get("rounds", 0),
            "mean_accepted": st.get("mean_accepted", 0.0),
            "target_forwards": st.get("target_forwards", 0),
            "seconds": st.get("seconds", 0.0),
            "tokens_per_s": st.get("tokens_per_s", 0.0),
            "finish_reason": self.finish_reason,
            "mode": st.get("mode"),
            "prompt_tokens": self.usage.get("prompt_tokens"),
        }


class Client:
    """An aiohttp session bound to one daemon. Use as ``async with Client(url) as c: ...``."""

    def __init__(self, url: str | None = None, api_key: str | None = None, timeout: float | None = None):
        self.url = normalise_url(url or default_peer())
        headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self._timeout = aiohttp.ClientTimeout(total=timeout, sock_connect=5)
        self._headers = headers
        self.session: aiohttp.ClientSession | None = None

    async def __aenter__(self) -> Client:
        self.session = aiohttp.ClientSession(headers=self._headers, timeout=self._timeout)
        return self

    async def __aexit__(self, *exc: object) -> None:
        if self.session is not None:
            await self.session.close()

    # ---- plumbing ---------------------------------------------------------------------------
    def _unreachable(self, exc: BaseException) -> DaemonUnreachable:
        os_error = getattr(exc, "os_error", None)
        if isinstance(exc, asyncio.TimeoutError):
            why = "timed out"
        elif isinstance(os_error, ConnectionRefusedError):
            why = "connection refused"
        elif os_error is not None:
            why = (os_error.strerror or str(os_error)).lower()
        else:
            why = str(exc) or exc.__class__.__name__
        return DaemonUnreachable(f"cannot reach the meshd daemon at {self.url} ({why}); {UNREACHABLE_HINT}")

    async def _raise_for(self, resp: aiohttp.ClientResponse) -> None:
        if resp.status < 400:
            return
        text = await resp.text()
        try:
            err = json.loads(text)["error"]
            msg, code = err.get("message") or text, err.get("code")
        except (ValueError, KeyError, TypeError, AttributeError):
            msg, code = text.strip() or resp.reason or "no details", None
        if resp.status == 401:
            msg += " (pass --api-key or set MESHD_API_KEY)"
        raise RequestFailed(resp.status, msg, code)

    async def get_json(self, path: str) -> Any:
        assert self.session is not None, "use Client as an async context manager"
        try:
            async with self.session.get(self.url + path) as resp:
                await self._raise_for(resp)
                return await resp.json()
        except (aiohttp.ClientConnectionError, asyncio.TimeoutError) as exc:
            raise self._unreachable(exc) from None

    # ---- endpoints --------------------------------------------------------------------------
    async def status(self) -> dict[str, Any]:
        return await self.get_json("/mesh")

    async def health(self) -> tuple[bool, str]:
        assert self.session is not None
        try:
            async with self.session.get(self.url + "/health") as resp:
                body = await resp.json(content_type=None)
                return resp.status == 200, (body or {}).get("reason") or ""
        except (aiohttp.ClientConnectionError, asyncio.TimeoutError) as exc:
            raise self._unreachable(exc) from None
        except ValueError:
            return False, "the daemon's /health did not answer JSON"

    async def chat(self, messages: list[dict[str, str]], **params: Any) -> Reply:
        """A non-streaming chat completion."""
        assert self.session is not None
        body = {"messages": messages, **_clean(params), "stream": False}
        try:
            async with self.session.post(self.url + "/v1/chat/completions", json=body) as resp:
                await self._raise_for(resp)
                data = await resp.json()
        except (aiohttp.ClientConnectionError, asyncio.TimeoutError) as exc:
            raise self._unreachable(exc) from None
        choice = data["choices"][0]
        return Reply(
            choice["message"]["content"] or "",
            choice.get("finish_reason"),
            data.get("usage") or {},
            data.get("meshd") or {},
        )

    async def stream_chat(self, messages: list[dict[str, str]], reply: Reply, **params: Any) -> AsyncIterator[str]:
        """Yield text deltas as the daemon accepts tokens; ``reply`` is filled in as the stream ends."""
        assert self.session is not None
        body = {"messages": messages, **_clean(params), "stream": True}
        try:
            async with self.session.post(self.url + "/v1/chat/completions", json=body) as resp:
                await self._raise_for(resp)
                async for event in _sse(resp):
                    if event == "[DONE]":
                        return
                    data = json.loads(event)
                    if "error" in data:
                        err = data["error"] or {}
                        raise RequestFailed(resp.status, err.get("message") or "the stream failed", err.get("code"))
                    for choice in data.get("choices") or []:
                        delta = (choice.get("delta") or {}).get("content")
                        if delta:
                            reply.text += delta
                            yield delta
                        if choice.get("finish_reason"):
                            reply.finish_reason = choice["finish_reason"]
                    if data.get("usage"):
                        reply.usage = data["usage"]
                    if data.get("meshd"):
                        reply.stats = data["meshd"]
            raise RequestFailed(200, "the stream ended without [DONE]: the daemon may have stopped mid-answer")
        except (aiohttp.ClientConnectionError, asyncio.TimeoutError, aiohttp.ClientPayloadError) as exc:
            raise self._unreachable(exc) from None


async def _sse(resp: aiohttp.ClientResponse) -> AsyncIterator[str]:
    """The ``data:`` payloads of a server-sent-event stream, one per event."""
    data: list[str] = []
    async for raw in resp.content:
        line = raw.decode("utf-8").rstrip("\r\n")
        if not line:
            if data:
                yield "\n".join(data)
                data = []
        elif line.startswith("data:"):
            data.append(line[5:].lstrip(" "))
    if data:
        yield "\n".join(data)


def _clean(params: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in params.items() if v is not None}
