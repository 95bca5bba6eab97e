"""``meshd query``, ``meshd chat`` and ``meshd status`` as real processes against a real HTTP server
(the REST API over a fake runtime), plus the status view on its own."""

from __future__ import annotations

import asyncio
import io
import json
import os
import sys

import pytest
from support import REPLY, serve

from meshd.cli import build_parser
from meshd.client.commands import chat_loop
from meshd.client.statusview import render
from meshd.serve.api import create_app
from models.text import encode_messages

pytestmark = pytest.mark.timeout(60)


async def meshd(*argv: str, stdin: str | None = None, env: dict | None = None) -> tuple[int, str, str]:
    environ = {k: v for k, v in os.environ.items() if not k.startswith("MESHD_")} | (env or {})
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "meshd.cli",
        *argv,
        stdin=asyncio.subprocess.PIPE,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
        env=environ,
    )
    out, err = await asyncio.wait_for(proc.communicate(stdin.encode() if stdin is not None else b""), 30)
    return proc.returncode, out.decode(), err.decode()


async def test_query_json_has_generate_fields(rt, url):
    code, out, err = await meshd("query", "Say hello.", "--peer", url, "--json", "--mode", "ar", "--max-tokens", "500")
    assert code == 0, err
    res = json.loads(out)
    assert res["text"] == REPLY and res["token_ids"] == rt.reply_ids
    assert {"new_tokens", "rounds", "mean_accepted", "seconds", "tokens_per_s"} <= set(res)
    assert res["new_tokens"] == len(rt.reply_ids) and res["mode"] == "ar"
    prompt, params = rt.submitted[-1]
    assert prompt == encode_messages(rt.tokenizer, [{"role": "user", "content": "Say hello."}])
    assert (params.mode, params.max_tokens, params.sampling.temperature) == ("ar", 500, 0.0)


async def test_query_streams_text_and_prints_stats(url):
    code, out, err = await meshd("query", "hi", "--max-tokens", "500", env={"MESHD_PEER": url})
    assert code == 0, err
    assert out == REPLY + "\n"
    assert "[flow]" in err and "tokens/round" in err


async def test_chat_piped_multi_turn_with_commands(rt, url):
    script = "first question\n/stats\n/mode ar\nsecond question\n/reset\nthird\n/mode turbo\n/quit\nnot sent\n"
    code, out, err = await meshd("chat", "--peer", url, "--max-tokens", "500", "--system", "Be brief.", stdin=script)
    assert code == 0, err
    assert out.count(REPLY) == 3
    assert "tokens/round" in out and "(mode ar)" in out and "(conversation reset)" in out
    assert "choose one of flow, chunk, ar" in out
    assert len(rt.submitted) == 3
    sys_msg = {"role": "system", "content": "Be brief."}
    first = [sys_msg, {"role": "user", "content": "first question"}]
    second = [*first, {"role": "assistant", "content": REPLY}, {"role": "user", "content": "second question"}]
    third = [sys_msg, {"role": "user", "content": "third"}]
    assert [p for p, _ in rt.submitted] == [encode_messages(rt.tokenizer, m) for m in (first, second, third)]
    assert [params.mode for _, params in rt.submitted] == ["flow", "ar", "ar"]


async def test_chat_loop_in_process_drops_failed_turns(rt, url):
    rt.not_ready = "no committed plan: waiting for peers"
    out = io.StringIO()
    code = await chat_loop(build_parser().parse_args(["chat", "--peer", url]), io.StringIO("hello\n"), out)
    assert code == 1 and "503" in out.getvalue() and "waiting for peers" in out.getvalue()


async def test_status_readable_and_json(url):
    code, out, err = await meshd("status", "--peer", url)
    assert code == 0, err
    assert "plan    epoch 3, committed, 2 stage(s)" in out
    assert "1. a1b2c3d4e5f6  layers   0:15  (15 layers)  this node  [ok]" in out
    assert "2. ffee00112233  layers  15:30  (15 layers)  127.0.0.1:1  [unreachable" in out
    assert "utilisation 25.0%" in out
    code, out, _ = await meshd("status", "--peer", url, "--json")
    assert code == 0 and json.loads(out)["plan"]["epoch"] == 3


async def test_unreachable_daemon_says_what_to_do():
    for cmd in (["query", "hi"], ["status"], ["chat"]):
        code, out, err = await meshd(*cmd, "--peer", "http://127.0.0.1:1", stdin="hi\n")
        assert code == 1, cmd
        assert "cannot reach the meshd daemon at http://127.0.0.1:1" in err + out
        assert "is `meshd serve` running? try `systemctl status meshd`" in err + out


async def test_api_key_from_flag_or_env(rt):
    async with serve(create_app(rt, api_key="k3y")) as url:
        code, _, err = await meshd("query", "hi", "--peer", url, "--json")
        assert code == 1 and "401" in err and "--api-key" in err
        code, out, err = await meshd("query", "hi", "--peer", url, "--json", "--api-key", "k3y")
        assert code == 0 and json.loads(out)["text"] == REPLY, err
        code, _, err = await meshd("status", "--peer", url, env={"MESHD_API_KEY": "k3y"})
        assert code == 0, err


def test_status_view_without_plan():
    text = render(
        "http://x:8090", {"node_id": "abc", "ready": False, "reason": "waiting for peers", "plan": None, "peers": []}
    )
    assert "NOT READY: waiting for peers" in text and "plan    none yet" in text and "peers   0" in text


async def test_chat_skips_the_comment_lines_of_a_paused_stream(rt):
    rt.pause_at = (6, 0.5)
    async with serve(create_app(rt, idle_comment_s=0.1)) as url:
        out = io.StringIO()
        code = await chat_loop(build_parser().parse_args(["chat", "--peer", url]), io.StringIO("hello\n"), out)
    assert code == 0 and REPLY in out.getvalue() and "paused" not in out.getvalue()
