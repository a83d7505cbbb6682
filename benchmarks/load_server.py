"""Load a real ``sfr-export serve`` on 127.0.0.1 with a bounded loop of concurrent clients.

Reports requests/s, inputs/s, p50/p99 latency per concurrency level, and the ratio of the server's throughput at
saturation to the direct library's (``Embedder.encode``) on the same artifact, measured in the same run while the
server is stopped, once before and once after the server (the machine's cores are shared, so the two are measured one
after the other, not at once; the mean of the two library runs is the reference).

    python benchmarks/load_server.py out/tiny --concurrency 1,8,32,64 --requests 400 --texts-per-request 4
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import statistics
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests" / "serve"))

WORDS = ("alpha beta gamma delta river stone cloud engine violet quantum harbor lantern maple orbit signal "
         "copper meadow silent thunder garden").split()


def make_texts(n: int, seed: int, words: int) -> list[str]:
    rng = random.Random(seed)
    return [f"{i} " + " ".join(rng.choice(WORDS) for _ in range(rng.randint(words // 2, words))) for i in range(n)]


def pct(xs: list[float], q: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(round(q / 100 * (len(xs) - 1))))]


def library_throughput(artifact: Path, texts: list[str], batch_size: int, max_batch_tokens: int, variant: str | None,
                       seconds: float) -> dict[str, float]:
    from sfr_export import Embedder

    from sfr_export.serve.app import SERVER_SESSION_CONFIG

    # the same ONNX Runtime settings as the server, so the ratio compares serving overhead only
    emb = Embedder.from_artifact(artifact, variant=variant, batch_size=batch_size, max_batch_tokens=max_batch_tokens,
                                 session_config=SERVER_SESSION_CONFIG)
    emb.encode(texts[:64])  # warm-up
    done, t0 = 0, time.perf_counter()
    while time.perf_counter() - t0 < seconds:
        emb.encode(texts)
        done += len(texts)
    dt = time.perf_counter() - t0
    emb.close()
    return {"inputs_per_s": done / dt, "seconds": dt, "inputs": done}


class Conn:
    """A minimal HTTP/1.1 keep-alive client on loopback: httpx costs more CPU per request than the server itself,
    and the load generator shares the machine's cores with the server."""

    def __init__(self, host: str, port: int):
        self.host, self.port = host, port
        self.reader: asyncio.StreamReader | None = None
        self.writer: asyncio.StreamWriter | None = None

    async def post(self, path: str, body: bytes) -> tuple[int, bytes]:
        if self.writer is None:
            self.reader, self.writer = await asyncio.open_connection(self.host, self.port)
        assert self.reader is not None
        self.writer.write(f"POST {path} HTTP/1.1\r\nHost: {self.host}\r\nContent-Type: application/json\r\n"
                          f"Content-Length: {len(body)}\r\n\r\n".encode() + body)
        head = await self.reader.readuntil(b"\r\n\r\n")
        lines = head.decode("latin-1").split("\r\n")
        status = int(lines[0].split()[1])
        length = next(int(x.split(":", 1)[1]) for x in lines[1:] if x.lower().startswith("content-length:"))
        data = await self.reader.readexactly(length)
        if any(x.lower() == "connection: close" for x in lines):
            self.close()
        return status, data

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
            self.writer = None


async def run_level(url: str, concurrency: int, n_requests: int, per_request: int, words: int, time_cap: float,
                    fmt: str) -> dict[str, float]:
    host, port = url.removeprefix("http://").split(":")
    if host != "127.0.0.1":
        raise SystemExit("load_server.py only talks to 127.0.0.1")
    texts = make_texts(n_requests * per_request, seed=concurrency, words=words)
    bodies = [json.dumps({"input": texts[i * per_request:(i + 1) * per_request], "encoding_format": fmt}).encode()
              for i in range(n_requests)]
    lat: list[float] = []
    codes: dict[int, int] = {}
    next_req = 0
    t0 = time.perf_counter()

    async def worker() -> None:
        nonlocal next_req
        conn = Conn(host, int(port))
        try:
            while next_req < n_requests and time.perf_counter() - t0 < time_cap:
                i = next_req
                next_req += 1
                s = time.perf_counter()
                status, data = await asyncio.wait_for(conn.post("/v1/embeddings", bodies[i]), 120)
                lat.append(time.perf_counter() - s)
                codes[status] = codes.get(status, 0) + 1
                if i == 0 and status == 200:  # spot check the payload of one response
                    assert len(json.loads(data)["data"]) == per_request
        finally:
            conn.close()

    await asyncio.gather(*(worker() for _ in range(concurrency)))
    dt = time.perf_counter() - t0
    ok = codes.get(200, 0)
    return {"concurrency": concurrency, "requests": len(lat), "ok": ok, "codes": codes, "seconds": dt,
            "requests_per_s": ok / dt, "inputs_per_s": ok * per_request / dt,
            "p50_ms": 1000 * statistics.median(lat), "p99_ms": 1000 * pct(lat, 99)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("artifact", type=Path)
    ap.add_argument("--concurrency", default="1,8,32,64")
    ap.add_argument("--requests", type=int, default=400, help="requests per concurrency level (bounded loop)")
    ap.add_argument("--texts-per-request", type=int, default=4)
    ap.add_argument("--words", type=int, default=24, help="max words per text")
    ap.add_argument("--time-cap", type=float, default=60.0, help="seconds per level, at most")
    ap.add_argument("--library-seconds", type=float, default=10.0)
    ap.add_argument("--variant", default=None)
    ap.add_argument("--encoding-format", default="float", choices=("float", "base64"))
    ap.add_argument("--max-batch-tokens", type=int, default=8192)
    ap.add_argument("--max-batch-size", type=int, default=64)
    ap.add_argument("--max-wait-ms", type=float, default=5.0)
    ap.add_argument("--json", type=Path, default=None, help="write the results here")
    a = ap.parse_args()

    from serve_helpers import start_server

    levels = [int(x) for x in a.concurrency.split(",")]
    lib_texts = make_texts(max(256, a.texts_per_request * 64), seed=7, words=a.words)
    lib = library_throughput(a.artifact, lib_texts, a.max_batch_size, a.max_batch_tokens, a.variant, a.library_seconds)
    print(f"library: {lib['inputs_per_s']:.1f} inputs/s (Embedder.encode, batch {a.max_batch_size})", flush=True)

    args = ["--max-batch-tokens", str(a.max_batch_tokens), "--max-batch-size", str(a.max_batch_size),
            "--max-wait-ms", str(a.max_wait_ms), "--max-queue", "100000"]
    if a.variant:
        args += ["--variant", a.variant]
    log_dir = Path("/tmp") / "sfr-load-server"
    log_dir.mkdir(exist_ok=True)
    srv = start_server(a.artifact, log_dir, *args)
    rows = []
    try:
        asyncio.run(run_level(srv.url, 4, 20, a.texts_per_request, a.words, 30, a.encoding_format))  # warm-up
        for c in levels:
            r = asyncio.run(run_level(srv.url, c, a.requests, a.texts_per_request, a.words, a.time_cap, a.encoding_format))
            r["ratio_vs_library"] = r["inputs_per_s"] / lib["inputs_per_s"]
            rows.append(r)
            print(f"c={c:3d}: {r['requests_per_s']:7.1f} req/s {r['inputs_per_s']:8.1f} inputs/s  p50 {r['p50_ms']:7.1f} ms"
                  f"  p99 {r['p99_ms']:7.1f} ms  codes {r['codes']}  server/library(before) {r['ratio_vs_library']:.2f}",
                  flush=True)
    finally:
        srv.stop()
    # the library again after the server: on a shared machine the load drifts, so the ratio uses the mean of both
    lib_after = library_throughput(a.artifact, lib_texts, a.max_batch_size, a.max_batch_tokens, a.variant, a.library_seconds)
    lib_mean = (lib["inputs_per_s"] + lib_after["inputs_per_s"]) / 2
    print(f"library after: {lib_after['inputs_per_s']:.1f} inputs/s; mean {lib_mean:.1f}", flush=True)
    for r in rows:
        r["ratio_vs_library"] = r["inputs_per_s"] / lib_mean
    lib = {"before": lib, "after": lib_after, "inputs_per_s": lib_mean}
    best = max(rows, key=lambda r: r["inputs_per_s"])
    summary = {"artifact": str(a.artifact), "library": lib, "levels": rows, "saturation": best,
               "server_vs_library": best["ratio_vs_library"], "texts_per_request": a.texts_per_request}
    print(f"saturation: c={best['concurrency']} {best['inputs_per_s']:.1f} inputs/s = "
          f"{best['ratio_vs_library']:.2f} x library; p99 {best['p99_ms']:.1f} ms")
    if a.json:
        a.json.write_text(json.dumps(summary, indent=2))


if __name__ == "__main__":
    main()
