"""Web pages must not use a daemon through its users' browsers.

Before the Origin/Host checks, any page a user opened could POST to http://127.0.0.1:8090 (a
"simple" text/plain request needs no preflight), and a hostile DNS name re-pointed at 127.0.0.1
(DNS rebinding) could read the answers too.
"""

from __future__ import annotations

import aiohttp
from support import FakeRuntime, serve

from meshd.serve.api import create_app
from meshd.serve.guard import GuardSettings, RestGuard

CHAT = "/v1/chat/completions"
BODY = '{"messages": [{"role": "user", "content": "hi"}], "max_tokens": 3}'


async def post(url: str, headers: dict[str, str]) -> tuple[int, dict, aiohttp.typedefs.LooseHeaders]:
    async with aiohttp.ClientSession() as s, s.post(url + CHAT, data=BODY, headers=headers) as r:
        return r.status, await r.json(), r.headers


async def test_a_cross_origin_browser_post_is_refused(url, rt):
    # what a page on another site sends with fetch(..., {method: "POST", body, mode: "no-cors"})
    status, body, _ = await post(url, {"Origin": "https://evil.example", "Content-Type": "text/plain"})
    assert status == 403 and body["error"]["code"] == "cross_origin_refused"
    status, _, _ = await post(url, {"Sec-Fetch-Site": "cross-site", "Content-Type": "text/plain"})
    assert status == 403  # a browser that leaves Origin out still says where the request comes from
    assert rt.submitted == []  # nothing reached the engine


async def test_same_origin_pages_and_non_browser_clients_pass(url):
    host = url.removeprefix("http://")
    status, _, _ = await post(url, {"Origin": url, "Content-Type": "application/json"})  # the daemon's own page
    assert status == 200
    status, _, _ = await post(url, {"Content-Type": "application/json"})  # curl, the openai client
    assert status == 200
    status, _, _ = await post(url, {"Origin": f"http://{host}", "Sec-Fetch-Site": "same-origin"})
    assert status == 200


async def test_dns_rebinding_host_names_are_refused(url):
    port = url.rsplit(":", 1)[1]
    status, body, _ = await post(url, {"Host": f"attacker.example:{port}", "Content-Type": "application/json"})
    assert status == 421 and "does not answer to the host name" in body["error"]["message"]
    async with aiohttp.ClientSession() as s, s.get(url + "/mesh", headers={"Host": "rebind.example"}) as r:
        assert r.status == 421  # reads too, not only writes
    for ok in (f"localhost:{port}", f"127.0.0.1:{port}", f"[::1]:{port}"):
        status, _, _ = await post(url, {"Host": ok, "Content-Type": "application/json"})
        assert status == 200, ok


async def test_cors_allow_list_is_opt_in(embedded_tokenizer):
    guard = RestGuard(GuardSettings(cors_origins=("http://ui.example:3000",), allowed_hosts=("meshd.lan",)))
    async with serve(create_app(FakeRuntime(embedded_tokenizer), guard=guard)) as url:
        status, _, headers = await post(url, {"Origin": "http://ui.example:3000", "Content-Type": "application/json"})
        assert status == 200 and headers["Access-Control-Allow-Origin"] == "http://ui.example:3000"
        async with aiohttp.ClientSession() as s:
            pre = {"Origin": "http://ui.example:3000", "Access-Control-Request-Method": "POST"}
            async with s.options(url + CHAT, headers=pre) as r:
                assert r.status == 204 and r.headers["Access-Control-Allow-Origin"] == "http://ui.example:3000"
        status, _, _ = await post(url, {"Origin": "http://other.example", "Content-Type": "application/json"})
        assert status == 403
        port = url.rsplit(":", 1)[1]
        status, _, _ = await post(url, {"Host": f"meshd.lan:{port}", "Content-Type": "application/json"})
        assert status == 200  # an allowed host name
