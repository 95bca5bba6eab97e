"""Resume under load on real loopback daemons: the pause each client sees when a stage goes.

``python -m meshd.lab.resume --how kill|term|cut [--requests 5] [--tokens 48]`` starts three daemons
(fp32), asks each question once on the intact mesh (the uninterrupted run), then streams the same
questions at once through the two daemons that do not hold the middle stage, takes that stage away
(SIGKILL; SIGTERM, which hands its layers over and then leaves; or its links cut while it lives) and
reports, per client, whether its text equals the uninterrupted one, how often it was resumed and
the longest gap between two chunks it received (its pause). With ``--grow-back`` (kill only) the
stage is restarted while a second round of streams runs, and the time until the plan has 3 stages
again is reported.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from http.client import HTTPConnection
from pathlib import Path

from meshd.lab.bench import EVERYDAY
from meshd.lab.testbed import LoopbackMesh, http
from training.prompts import load_questions

MODEL = "default"


@dataclass
class Stream:
    """One streaming client: when each text chunk arrived, the text, and the final ``meshd`` statistics."""

    question: str
    port: int
    max_tokens: int = 48
    times: list[float] = field(default_factory=list)
    text: str = ""
    meshd: dict | None = None
    error: str | None = None  # the error event's message, or what broke the stream
    comments: list[str] = field(default_factory=list)  # SSE comment lines (the daemon's "paused ..." notes)

    def run(self) -> None:
        body = {
            "model": MODEL,
            "messages": [{"role": "user", "content": self.question}],
            "max_tokens": self.max_tokens,
            "temperature": 0,
            "stream": True,
        }
        try:
            conn = HTTPConnection("127.0.0.1", self.port, timeout=180)
            conn.request("POST", "/v1/chat/completions", json.dumps(body), {"content-type": "application/json"})
            resp = conn.getresponse()
            if resp.status != 200:
                self.error = f"HTTP {resp.status}: {resp.read()[:300]!r}"
                return
            for raw in resp:
                line = raw.decode().strip()
                if line.startswith(":"):
                    self.comments.append(line[1:].strip())
                if not line.startswith("data: ") or line == "data: [DONE]":
                    continue
                chunk = json.loads(line[6:])
                if "error" in chunk:
                    err = chunk["error"]
                    self.error = str(err.get("message") or err) if isinstance(err, dict) else str(err)
                    return
                for c in chunk.get("choices", []):
                    if c["delta"].get("content"):
                        self.text += c["delta"]["content"]
                        self.times.append(time.monotonic())
                if chunk.get("meshd"):
                    self.meshd = chunk["meshd"]
            if self.meshd is None:
                self.error = "the stream ended without its final chunk"
        except Exception as exc:  # reported with the others
            self.error = f"{type(exc).__name__}: {exc}"

    @property
    def pause(self) -> float:
        """The longest wait between two chunks: what the client saw of a resume."""
        return max((b - a for a, b in zip(self.times, self.times[1:])), default=0.0)


def start_streams(
    mesh: LoopbackMesh, origins: list[int], questions: list[str], max_tokens: int, timeout: float = 120
) -> tuple[list[Stream], list[threading.Thread]]:
    """One streaming client per question, spread over ``origins``; returns once every one has tokens
    (every request is live on the ring) or failed."""
    streams = [Stream(q, mesh.ports[origins[k % len(origins)]], max_tokens) for k, q in enumerate(questions)]
    threads = [threading.Thread(target=s.run, daemon=True) for s in streams]
    for t in threads:
        t.start()
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and not all(s.times or s.error for s in streams):
        time.sleep(0.05)
    return streams, threads


def middle_stage(mesh: LoopbackMesh, plan: dict) -> tuple[int, list[int]]:
    """The daemon holding the middle stage (the one to take away) and the other two (the originators)."""
    victim = next(i for i in range(3) if mesh.stage_index(i, plan) == 1)
    return victim, [i for i in range(3) if i != victim]


def disrupt(mesh: LoopbackMesh, victim: int, how: str) -> None:
    {"kill": mesh.kill, "term": mesh.terminate, "cut": mesh.cut}[how](victim)


def extra_flags(how: str) -> list[str]:
    return {"kill": [], "term": ["--drain-timeout", "60"], "cut": ["--partitionable"]}[how]


def uninterrupted(
    mesh: LoopbackMesh, origin: int, questions: list[str], max_tokens: int
) -> list[tuple[str, list[int]]]:
    """Each question's text and token ids from the intact mesh, one at a time (the uninterrupted run)."""
    runs = []
    for q in questions:
        body = {"model": MODEL, "messages": [{"role": "user", "content": q}], "max_tokens": max_tokens}
        code, out = http("POST", mesh.url(origin) + "/v1/chat/completions", {**body, "temperature": 0}, timeout=300)
        if code != 200:
            raise RuntimeError(f"the uninterrupted run failed: HTTP {code}: {out}")
        runs.append((out["choices"][0]["message"]["content"], out["meshd"]["token_ids"]))
    return runs


def report(label: str, streams: list[Stream], want: list[tuple[str, list[int]]] | None) -> list[dict]:
    rows = []
    for k, s in enumerate(streams):
        row = {
            "client": k,
            "ok": s.error is None,
            "same_text": (s.text == want[k][0]) if want is not None and s.error is None else None,
            "resumed": s.meshd["resumed"] if s.meshd else None,
            "pause_s": round(s.pause, 2),
            "paused_seconds": s.meshd["paused_seconds"] if s.meshd else None,
            "error": s.error,
        }
        rows.append(row)
        print(f"{label}: " + ", ".join(f"{k}={v}" for k, v in row.items() if v is not None or k == "same_text"))
    return rows


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m meshd.lab.resume", description=__doc__.split("\n\n")[0])
    p.add_argument("--how", choices=("kill", "term", "cut"), default="kill")
    p.add_argument("--requests", type=int, default=5)
    p.add_argument("--tokens", type=int, default=48)
    p.add_argument("--grow-back", action="store_true", help="(kill) restart the stage during a second round")
    p.add_argument("--workdir", type=Path, default=None)
    args = p.parse_args(argv)
    questions = [q["turns"][0] for q in load_questions(EVERYDAY, args.requests, 1)][: args.requests]
    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="meshd-resume-"))
    with LoopbackMesh(workdir, 3, extra=extra_flags(args.how)) as mesh:
        plan = mesh.wait_plan([0, 1, 2], 3, timeout=300)
        victim, origins = middle_stage(mesh, plan)
        want = uninterrupted(mesh, origins[0], questions, args.tokens)
        streams, threads = start_streams(mesh, origins, questions, args.tokens)
        t0 = time.monotonic()
        disrupt(mesh, victim, args.how)
        for t in threads:
            t.join(300)
        print(f"{args.how}: every request done {time.monotonic() - t0:.1f} s after the disruption")
        rows = report(args.how, streams, want)
        if args.grow_back and args.how == "kill":
            mesh.wait_plan(origins, 2, timeout=120)
            streams, threads = start_streams(mesh, origins, questions, args.tokens)
            mesh.restart(victim)
            t0 = time.monotonic()
            mesh.wait_plan([0, 1, 2], 3, timeout=300)
            print(f"grow back: 3 stages again {time.monotonic() - t0:.1f} s after the restart")
            for t in threads:
                t.join(300)
            rows += report("grow back", streams, want)
    return 0 if all(r["ok"] and r["same_text"] is not False for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
