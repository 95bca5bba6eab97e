"""What sealing a link costs: microseconds per frame and per row, next to the codec's own cost.

``python -m meshd.lab.linkcost [--hidden 576] [--rows 1,16,64,512] [--repeats 300] [--dtype fp16]``

For each size it times, interleaved round by round so machine noise hits both alike, (a) encoding
and decoding a ``segment`` frame carrying ``rows`` hidden states, which every link pays with or
without protection, and (b) sealing and opening that frame with the link's session keys
(ChaCha20-Poly1305, 64 KiB chunks, ``peers/channel.py``), which is what protection adds. Medians are
reported, with the AEAD's share of (a) + (b) and its throughput.
"""

from __future__ import annotations

import argparse
import secrets
import statistics
import time
from collections.abc import Callable, Sequence

import torch

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


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m meshd.lab.linkcost", description=__doc__.splitlines()[0])
    p.add_argument("--hidden", type=int, default=576, help="hidden size (SmolLM2-135M: 576)")
    p.add_argument("--rows", default="1,16,64,512", help="comma-separated rows per frame")
    p.add_argument("--repeats", type=int, default=300)
    p.add_argument("--dtype", choices=sorted(DTYPES), default="fp16", help="dtype of the hidden states on the wire")
    args = p.parse_args(argv)
    torch.manual_seed(0)
    head = ("rows", "bytes", "msgs", "codec us", "aead us", "aead us/row", "share", "MB/s")
    print(" ".join(f"{h:>{w}}" for h, w in zip(head, (5, 9, 4, 9, 8, 11, 6, 6))))
    for rows in (int(r) for r in args.rows.split(",")):
        m = measure(rows, args.hidden, DTYPES[args.dtype], args.repeats)
        print(
            f"{m['rows']:>5} {m['bytes']:>9} {m['messages']:>4} {m['codec_us']:>9.1f} {m['aead_us']:>8.1f} "
            f"{m['aead_us_per_row']:>11.2f} {m['aead_share']:>6.0%} {m['aead_mb_s']:>6.0f}"
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
