"""What sealing a link costs: microseconds per frame and per row, and tokens/s of a running ring.

``python -m meshd.lab.linkcost [--hidden 576] [--rows 1,16,64,512] [--repeats 300] [--dtype fp16]``

For each size it times, interleaved round by round so machine noise hits both alike, (a) encoding
and decoding a ``segment`` frame carrying ``rows`` hidden states, which every link pays with or
without protection, and (b) sealing and opening that frame with the link's session keys
(ChaCha20-Poly1305, 64 KiB chunks, ``peers/channel.py``), which is what protection adds. Medians are
reported, with the AEAD's share of (a) + (b) and its throughput.

``python -m meshd.lab.linkcost flow [--prompts 8] [--rounds 2] [--max-tokens 64] [--stages 3]``

The same question on a real ring: two meshes of ``--stages`` loopback daemons run side by side, one
with sealed links and one started with the benchmark-only ``--insecure-plaintext-links`` (the same
frames and sequence numbers without the cipher). The same ``flow`` requests (greedy, so both meshes
generate the same tokens) alternate between them, A/B then B/A, so drift of the machine hits both
alike; the idle mesh only sends heartbeats. It reports tokens/s of each, their ratio, the
hidden-state bytes the sealed ring moved per token (from ``/metrics``), and the microbenchmark above
at the frame sizes the ring sends, so the measured difference can be set against the predicted one.
"""

from __future__ import annotations

import argparse
import json
import re
import secrets
import statistics
import sys
import tempfile
import time
import urllib.request
from collections.abc import Callable, Sequence
from pathlib import Path

import torch

from meshd.lab.testbed import LoopbackMesh, http
from peers.channel import SessionKeys
from peers.codec import Codec, Message

DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}


def segment(rows: int, hidden: int, dtype: torch.dtype) -> Message:
    """A later-stage segment: ``rows`` tree nodes with their hidden states (what dominates mesh traffic)."""
    return Message(
        "segment",
        {
            "origin": "0123456789abcdef",
            "nodes": list(range(rows)),
            "parents": [-1, *range(rows - 1)],
            "positions": list(range(rows)),
            "hidden": torch.randn(rows, hidden).to(dtype),
        },
        epoch=3,
        request_id=2**40,
    )


def measure(rows: int, hidden: int, dtype: torch.dtype, repeats: int) -> dict[str, float]:
    codec = Codec()
    msg = segment(rows, hidden, dtype)
    keys = SessionKeys.derive(secrets.token_bytes(32), secrets.token_bytes(32), secrets.token_bytes(32), "a", "b", b"")
    sealer, _ = keys.for_client()
    _, opener = keys.for_server()
    frame = codec.encode(msg)

    def codec_round() -> None:
        codec.decode(codec.encode(msg))

    def aead_round() -> None:
        for sealed in sealer.seal(frame):
            opener.open(sealed)

    rounds: dict[str, list[float]] = {"codec": [], "aead": []}
    steps: list[tuple[str, Callable[[], None]]] = [("codec", codec_round), ("aead", aead_round)]
    for fn in (codec_round, aead_round):  # warm up
        fn()
    for i in range(repeats):
        for name, fn in steps if i % 2 == 0 else steps[::-1]:  # alternate the order, too
            t0 = time.perf_counter()
            fn()
            rounds[name].append(time.perf_counter() - t0)
    codec_us = statistics.median(rounds["codec"]) * 1e6
    aead_us = statistics.median(rounds["aead"]) * 1e6
    return {
        "rows": rows,
        "bytes": len(frame),
        "messages": len(sealer.seal(frame)),
        "codec_us": codec_us,
        "aead_us": aead_us,
        "aead_us_per_row": aead_us / rows,
        "aead_share": aead_us / (codec_us + aead_us),
        "aead_mb_s": len(frame) / aead_us,
    }


def print_table(rows: Sequence[int], hidden: int, dtype: torch.dtype, repeats: int) -> list[dict[str, float]]:
    head = ("rows", "bytes", "msgs", "codec us", "aead us", "aead us/row", "share", "MB/s")
    print(" ".join(f"{h:>{w}}" for h, w in zip(head, (5, 9, 4, 9, 8, 11, 6, 6))))
    out = []
    for n in rows:
        m = measure(n, hidden, dtype, repeats)
        out.append(m)
        print(
            f"{m['rows']:>5} {m['bytes']:>9} {m['messages']:>4} {m['codec_us']:>9.1f} {m['aead_us']:>8.1f} "
            f"{m['aead_us_per_row']:>11.2f} {m['aead_share']:>6.0%} {m['aead_mb_s']:>6.0f}"
        )
    return out


# --- flow on real daemons, sealed against insecure plaintext links --------------------------------

PLAINTEXT_FLAG = "--insecure-plaintext-links"
PLAINTEXT_WARNING = "INSECURE PLAINTEXT LINKS"  # what peers/mesh.py logs at start: proof the switch took
_BYTES_SENT = re.compile(r'^meshd_peer_activation_bytes_total\{[^}]*direction="sent"[^}]*\} (\S+)$', re.M)


def activation_bytes_sent(mesh: LoopbackMesh) -> float:
    """Hidden-state bytes all daemons of ``mesh`` have sent to peers so far (``/metrics``)."""
    total = 0.0
    for i in range(len(mesh.ports)):
        with urllib.request.urlopen(mesh.url(i) + "/metrics", timeout=30) as r:
            total += sum(float(v) for v in _BYTES_SENT.findall(r.read().decode()))
    return total


def flow_request(mesh: LoopbackMesh, text: str, max_tokens: int) -> dict:
    code, body = http(
        "POST",
        mesh.url(0) + "/v1/chat/completions",
        {
            "messages": [{"role": "user", "content": text}],
            "max_tokens": max_tokens,
            "temperature": 0,
            "seed": 0,
            "mode": "flow",
        },
        timeout=600,
    )
    if code != 200:
        raise RuntimeError(f"daemon answered {code}: {body}")
    return {**body["meshd"], "text": body["choices"][0]["message"]["content"]}


def flow_ab(args: argparse.Namespace) -> dict:
    prompts = [json.loads(line)["turns"][0] for line in Path(args.questions).read_text().splitlines() if line.strip()]
    prompts = prompts[: args.prompts]
    work = Path(tempfile.mkdtemp(prefix="meshd-linkcost-"))
    extra = ["--drafter", args.drafter]
    arms = {"sealed": [], "plaintext": [PLAINTEXT_FLAG]}
    meshes: dict[str, LoopbackMesh] = {}
    try:
        for arm, flags in arms.items():  # both start at once; each waits for its own plan below
            meshes[arm] = LoopbackMesh(
                work / arm, args.stages, mdns=False, dtype=args.dtype, threads=1, extra=[*extra, *flags]
            )
        for arm, mesh in meshes.items():
            print(f"waiting for the {arm} mesh's plan ...", flush=True)
            mesh.wait_plan(list(range(args.stages)), args.stages, timeout=600)
        for arm in meshes:
            warned = all(PLAINTEXT_WARNING in (work / arm / f"node{i}.log").read_text() for i in range(args.stages))
            if warned != (arm == "plaintext"):
                raise RuntimeError(f"the {arm} mesh's daemons do not run the links they were asked for")
        flow_request(meshes["sealed"], prompts[0], 8), flow_request(meshes["plaintext"], prompts[0], 8)  # warm up
        bytes0 = activation_bytes_sent(meshes["sealed"])
        runs: dict[str, list[dict]] = {arm: [] for arm in arms}
        order = list(arms)
        n = 0
        for r in range(args.rounds):
            for k, text in enumerate(prompts):
                for arm in order if n % 2 == 0 else order[::-1]:  # A/B, then B/A
                    s = flow_request(meshes[arm], text, args.max_tokens)
                    runs[arm].append(s)
                    print(
                        f"round {r + 1} prompt {k + 1:>2} {arm:<9} {s['new_tokens']:>4} tokens "
                        f"{s['tokens_per_s']:6.2f} tok/s",
                        flush=True,
                    )
                n += 1
        sealed_bytes = activation_bytes_sent(meshes["sealed"]) - bytes0
    finally:
        for mesh in meshes.values():
            mesh.close()
    same = sum(a["text"] == b["text"] for a, b in zip(runs["sealed"], runs["plaintext"]))
    summary = {
        arm: {
            "requests": len(rs),
            "tokens": sum(x["new_tokens"] for x in rs),
            "seconds": round(sum(x["seconds"] for x in rs), 3),
            "tokens_per_s": round(sum(x["new_tokens"] for x in rs) / sum(x["seconds"] for x in rs), 3),
        }
        for arm, rs in runs.items()
    }
    # Each pair ran back to back: the ratio per pair shows the spread that drift leaves.
    pair_ratios = [
        (a["new_tokens"] / a["seconds"]) / (b["new_tokens"] / b["seconds"])
        for a, b in zip(runs["sealed"], runs["plaintext"])
    ]
    tokens = summary["sealed"]["tokens"]
    return {
        "stages": args.stages,
        "dtype": args.dtype,
        "drafter": args.drafter,
        "prompts": len(prompts),
        "rounds": args.rounds,
        "max_tokens": args.max_tokens,
        "same_text": f"{same}/{len(runs['sealed'])}",
        "arms": summary,
        "sealed_over_plaintext": round(summary["sealed"]["tokens_per_s"] / summary["plaintext"]["tokens_per_s"], 4),
        "pair_ratio_median": round(statistics.median(pair_ratios), 4),
        "pair_ratio_range": [round(min(pair_ratios), 4), round(max(pair_ratios), 4)],
        "hidden_bytes_sent_per_token": round(sealed_bytes / tokens, 1) if tokens else None,
        "logs": str(work),
    }


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["flow"]:
        return main_flow(argv[1:])
    p = argparse.ArgumentParser(prog="python -m meshd.lab.linkcost", description=__doc__.splitlines()[0])
    p.add_argument("--hidden", type=int, default=576, help="hidden size (SmolLM2-135M: 576)")
    p.add_argument("--rows", default="1,16,64,512", help="comma-separated rows per frame")
    p.add_argument("--repeats", type=int, default=300)
    p.add_argument("--dtype", choices=sorted(DTYPES), default="fp16", help="dtype of the hidden states on the wire")
    args = p.parse_args(argv)
    torch.manual_seed(0)
    print_table([int(r) for r in args.rows.split(",")], args.hidden, DTYPES[args.dtype], args.repeats)
    return 0


def main_flow(argv: Sequence[str]) -> int:
    p = argparse.ArgumentParser(
        prog="python -m meshd.lab.linkcost flow",
        description="tokens/s of flow on loopback daemons with sealed links against insecure plaintext links, "
        "alternated in one run",
    )
    p.add_argument("--stages", type=int, default=3)
    p.add_argument("--prompts", type=int, default=8, help="how many of the question file's prompts")
    p.add_argument("--rounds", type=int, default=2, help="passes over the prompts")
    p.add_argument("--max-tokens", type=int, default=64)
    p.add_argument("--dtype", default="bf16", help="the daemons' compute dtype")
    p.add_argument("--drafter", default="auto")
    p.add_argument("--questions", default=str(Path(__file__).resolve().parent / "prompts" / "everyday.jsonl"))
    p.add_argument("--hidden", type=int, default=576, help="hidden size for the microbenchmark rows")
    p.add_argument("--rows", default="1,4,16,64", help="rows per frame for the microbenchmark after the run")
    p.add_argument("--out", default=None, help="also write the report here (JSON)")
    args = p.parse_args(argv)
    report = flow_ab(args)
    print(json.dumps(report, indent=2))
    print("\nthe AEAD per frame, measured right after (fp16 hidden states on the wire):")
    torch.manual_seed(0)
    table = print_table([int(r) for r in args.rows.split(",")], args.hidden, torch.float16, 300)
    per_row = statistics.median(m["aead_us_per_row"] for m in table[1:]) if len(table) > 1 else None
    report["microbenchmark"] = table
    row_bytes = args.hidden * 2
    if report["hidden_bytes_sent_per_token"] and per_row:
        rows_per_token = report["hidden_bytes_sent_per_token"] / row_bytes
        ms_per_token = 1000 / report["arms"]["sealed"]["tokens_per_s"]
        low, high = rows_per_token * per_row, rows_per_token * table[0]["aead_us"]  # frames of many rows .. of one
        report["predicted_aead_us_per_token"] = [round(low, 1), round(high, 1)]
        share = f"{low / ms_per_token / 10:.2f}-{high / ms_per_token / 10:.2f} %"
        print(
            f"\nthe sealed ring sent {rows_per_token:.1f} hidden rows per token; at {per_row:.2f} us per row "
            f"(large frames) to {table[0]['aead_us']:.1f} us (one row per frame) the AEAD costs "
            f"{low:.0f}-{high:.0f} us of a token's {ms_per_token * 1000:.0f} us ({share}), sending and receiving "
            f"ends together; measured: sealed/plaintext = {report['sealed_over_plaintext']}"
        )
    if args.out:
        Path(args.out).write_text(json.dumps(report, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
