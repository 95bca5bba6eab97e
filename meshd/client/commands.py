"""``meshd chat``, ``meshd query`` and ``meshd status``: the commands that talk to a running daemon.

They share the daemon's REST API with every other client (``meshd.client.http``), default to the
local daemon (``$MESHD_PEER`` or http://127.0.0.1:8090) and print errors as one actionable line.
``chat`` reads stdin line by line, so it works in a terminal and with piped input alike. Their
flags are defined with every other command's in ``meshd.cli``.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import sys
from typing import Any, TextIO

import aiohttp

from meshd.client import daemon_settings
from meshd.client.http import Client, ClientError, Reply
from meshd.client.statusview import render
from meshd.modes import MESH_MODES

CHAT_HELP = f"""commands: /reset (forget the conversation), /mode {"|".join(MESH_MODES)}, /stats (last reply's
speculative-decoding statistics), /help, /quit (or Ctrl-D)"""


def _client(args: argparse.Namespace, timeout: float | None = None) -> Client:
    peer, api_key = daemon_settings(args.peer, args.api_key, args.config)
    return Client(peer, api_key, timeout=timeout)


def _run(coro: Any) -> int:
    try:
        return asyncio.run(coro)
    except ClientError as exc:
        print(f"meshd: {exc}", file=sys.stderr)
        return 1


def _stats_line(reply: Reply) -> str:
    st = reply.stats
    if not st:
        return "no statistics (the daemon sent none)"
    return (
        f"[{st.get('mode')}] {st.get('new_tokens')} tokens in {st.get('seconds', 0):.2f}s "
        f"({st.get('tokens_per_s', 0):.1f} tok/s), {st.get('rounds')} rounds, "
        f"{st.get('mean_accepted', 0):.2f} tokens/round, {st.get('target_forwards')} target forwards, "
        f"finish: {reply.finish_reason}"
    )


# ---- query --------------------------------------------------------------------------------
def cmd_query(args: argparse.Namespace) -> int:
    return _run(_query(args))


async def _query(args: argparse.Namespace) -> int:
    messages = [{"role": "user", "content": args.prompt}]
    params = {
        "mode": args.mode,
        "max_tokens": args.max_tokens,
        "temperature": args.temperature,
        "top_p": args.top_p,
        "seed": args.seed,
    }
    async with _client(args) as client:
        if args.json:
            reply = await client.chat(messages, **params)
            print(json.dumps(reply.as_generate_json()))
            return 0
        reply = Reply()
        async for delta in client.stream_chat(messages, reply, **params):
            sys.stdout.write(delta)
            sys.stdout.flush()
        print()
        print(_stats_line(reply), file=sys.stderr)
    return 0


# ---- status -------------------------------------------------------------------------------
def cmd_status(args: argparse.Namespace) -> int:
    return _run(_status(args))


def _api_url(peer: dict[str, Any]) -> str | None:
    addr, port = peer.get("address"), peer.get("api_port")
    if not addr or not port:
        return None
    host = str(addr).rpartition(":")[0].strip("[]") or str(addr)
    return f"http://[{host}]:{port}" if ":" in host else f"http://{host}:{port}"


async def _probe(client: Client, url: str) -> str:
    """A peer's own /health, through the same session (same API key)."""
    assert client.session is not None
    try:
        async with client.session.get(url + "/health", timeout=aiohttp.ClientTimeout(total=2.0)) as resp:
            body = await resp.json(content_type=None)
            return "ok" if resp.status == 200 else f"unavailable: {(body or {}).get('reason') or resp.status}"
    except Exception as exc:  # any failure means the same thing here: not reachable from this machine
        if isinstance(exc, asyncio.TimeoutError):
            return "unreachable (timed out)"
        if isinstance(getattr(exc, "os_error", None), ConnectionRefusedError):
            return "unreachable (connection refused)"
        return f"unreachable ({exc.__class__.__name__})"


async def _status(args: argparse.Namespace) -> int:
    async with _client(args, timeout=10) as client:
        status = await client.status()
        if args.json:
            print(json.dumps(status, indent=2))
            return 0
        peers = [p for p in status.get("peers") or [] if isinstance(p, dict)]
        urls = {p.get("node_id"): _api_url(p) for p in peers}
        results = await asyncio.gather(*(_probe(client, u) for u in urls.values() if u))
        health = dict(zip([n for n, u in urls.items() if u], results))
        if status.get("node_id"):
            health[status["node_id"]] = "ok" if status.get("ready") else f"unavailable: {status.get('reason')}"
        print(render(client.url, status, health))
    return 0 if status.get("ready") else 3


# ---- chat ---------------------------------------------------------------------------------
def cmd_chat(args: argparse.Namespace) -> int:
    return _run(chat_loop(args, sys.stdin, sys.stdout))


async def _readline(stream: TextIO, prompt: str | None = None) -> str:
    """The next line ("" at EOF), read in a thread so the event loop stays free. With a prompt (a
    terminal) it goes through ``input()``, which gives line editing and history."""

    def read() -> str:
        if prompt is None:
            return stream.readline()
        try:
            return input(prompt) + "\n"
        except EOFError:
            return ""

    return await asyncio.get_running_loop().run_in_executor(None, read)


async def chat_loop(args: argparse.Namespace, stdin: TextIO, stdout: TextIO) -> int:
    """One conversation. Failed turns are dropped from the history so a retry starts clean."""
    interactive = stdin.isatty()
    if interactive:
        with contextlib.suppress(ImportError):  # not on every platform; imported only for a terminal
            import readline  # noqa: F401 - importing it gives input() line editing and history
    mode = args.mode
    system = [{"role": "system", "content": args.system}] if args.system else []
    history: list[dict[str, str]] = list(system)
    last: Reply | None = None

    def say(text: str, end: str = "\n") -> None:
        stdout.write(text + end)
        stdout.flush()

    async with _client(args) as client:
        if interactive:
            ok, why = await client.health()
            say(
                f"meshd chat with {client.url} ({'ready' if ok else 'not ready: ' + why}); mode {mode}. "
                "Type /help for commands."
            )
        while True:
            line = await _readline(stdin, "> " if interactive else None)
            if not line:  # EOF
                if interactive:
                    say("")
                return 0
            text = line.rstrip("\n")
            if not text.strip():
                continue
            cmd, _, arg = text.strip().partition(" ")
            if cmd in ("/quit", "/exit"):
                return 0
            if cmd == "/help":
                say(CHAT_HELP)
                continue
            if cmd == "/reset":
                history = list(system)
                say("(conversation reset)")
                continue
            if cmd == "/mode":
                if arg.strip() not in MESH_MODES:
                    say(f"(mode is {mode}; choose one of {', '.join(MESH_MODES)})")
                else:
                    mode = arg.strip()
                    say(f"(mode {mode})")
                continue
            if cmd == "/stats":
                say(_stats_line(last) if last else "(no reply yet)")
                continue
            if cmd.startswith("/") and " " not in cmd and cmd[1:].isalpha():
                say(f"(unknown command {cmd}; {CHAT_HELP})")
                continue
            history.append({"role": "user", "content": text})
            reply = Reply()
            try:
                async for delta in client.stream_chat(
                    history, reply, mode=mode, max_tokens=args.max_tokens, temperature=args.temperature, seed=args.seed
                ):
                    stdout.write(delta)
                    stdout.flush()
            except ClientError as exc:
                history.pop()
                say(f"\n(error: {exc})")
                if not interactive:
                    return 1
                continue
            say("")
            history.append({"role": "assistant", "content": reply.text})
            last = reply
