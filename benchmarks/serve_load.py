"""Load test of `mlpruning serve` over loopback HTTP: latency percentiles and throughput (not in pytest).

Starts the real CLI (``python -m mlpruning.cli serve``) in a child process, so the clients here
do not share a GIL with the server, waits for /health, sends a few warm-up requests, then fires
``--requests`` POST /predict requests from ``--concurrency`` client threads, each on its own
keep-alive connection. Texts are the model task's embedded dev sentences (SST-2 when the task is
unknown), in order, ``--texts`` per request. Latency is measured per request at the client
(send to full response); throughput is completed requests (and texts) over the wall time of the
measured phase. Prints one JSON object; the server's batching counters are included.

    .venv/bin/python benchmarks/serve_load.py runs/s2/r0.3-opt --requests 400 --concurrency 8 --threads 1
"""

from __future__ import annotations

import argparse
import http.client
import itertools
import json
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np

from deploy.batcher import peek_json
from pipeline.tasks import get_task, load_split


def sample_texts(folder: Path, n: int) -> list[Any]:
    task_name = (peek_json(folder / "pruning.json") or peek_json(folder / "export.json") or {}).get("task")
    task = get_task(task_name or "sst2")
    examples = load_split(task, "dev").texts
    return [ex[0] if len(ex) == 1 else list(ex) for ex in itertools.islice(itertools.cycle(examples), n)]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def start_server(target: Path, port: int, extra: list[str]) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "mlpruning.cli", "serve", str(target), "--port", str(port)]
    proc = subprocess.Popen(
        [*cmd, "--log-level", "warning", *extra], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE
    )
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"server exited: {proc.stderr.read().decode() if proc.stderr else ''}")
        try:
            if get(port, "/health")["status"] == "ok":
                return proc
        except OSError:
            time.sleep(0.2)
    proc.terminate()
    raise SystemExit("server did not answer /health within 120 s")


def get(port: int, path: str) -> dict[str, Any]:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    try:
        conn.request("GET", path)
        return json.loads(conn.getresponse().read())
    finally:
        conn.close()


def client(
    port: int, bodies: list[bytes], next_index: Any, latencies: list[float], errors: list[str]
) -> None:
    """Send bodies[i] for each i taken from the shared counter, on one keep-alive connection."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
    for i in next_index:
        if i >= len(bodies):
            break
        start = time.perf_counter()
        try:
            conn.request("POST", "/predict", body=bodies[i], headers={"Content-Type": "application/json"})
            response = conn.getresponse()
            payload = response.read()
        except (OSError, http.client.HTTPException) as exc:
            errors.append(f"{type(exc).__name__}: {exc}")
            conn.close()
            conn = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
            continue
        latencies.append(time.perf_counter() - start)
        if response.status != 200:
            errors.append(f"{response.status}: {payload[:200]!r}")
    conn.close()


def load(port: int, bodies: list[bytes], concurrency: int) -> tuple[list[float], list[str], float]:
    latencies: list[float] = []
    errors: list[str] = []
    counter = itertools.count()  # next() on it is atomic under the GIL: each index goes to one client
    threads = [
        threading.Thread(target=client, args=(port, bodies, counter, latencies, errors))
        for _ in range(concurrency)
    ]
    start = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return latencies, errors, time.perf_counter() - start


def summarize(
    args: argparse.Namespace,
    model: str,
    latencies: list[float],
    errors: list[str],
    wall: float,
    before: dict[str, Any],
    after: dict[str, Any],
) -> dict[str, Any]:
    ms = np.array(latencies) * 1000
    batches = after["batches"] - before["batches"]
    return {
        "model": model,
        "requests": args.requests,
        "concurrency": args.concurrency,
        "texts_per_request": args.texts,
        "threads": args.threads,
        "max_batch": args.max_batch,
        "max_wait_ms": args.max_wait_ms,
        "errors": len(errors),
        "first_errors": errors[:3],
        "p50_ms": round(float(np.percentile(ms, 50)), 2),
        "p90_ms": round(float(np.percentile(ms, 90)), 2),
        "p99_ms": round(float(np.percentile(ms, 99)), 2),
        "mean_ms": round(float(ms.mean()), 2),
        "throughput_req_s": round(len(latencies) / wall, 1),
        "throughput_texts_s": round(len(latencies) * args.texts / wall, 1),
        "wall_s": round(wall, 2),
        "server_batches": batches,
        "server_mean_batch": round((after["items"] - before["items"]) / max(batches, 1), 2),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("target", type=Path, help="model folder (model.onnx ...) or run folder")
    parser.add_argument("--requests", type=int, default=400)
    parser.add_argument("--concurrency", type=int, default=8)
    parser.add_argument("--texts", type=int, default=1, help="texts per request")
    parser.add_argument("--threads", type=int, default=1, help="server ORT threads")
    parser.add_argument("--max-batch", type=int, default=32)
    parser.add_argument("--max-wait-ms", type=float, default=2.0)
    args = parser.parse_args()

    from deploy.serve import resolve_target

    folder = resolve_target(args.target)[0]
    texts = sample_texts(folder, args.requests * args.texts)
    bodies = [
        json.dumps({"texts": texts[i : i + args.texts]}).encode() for i in range(0, len(texts), args.texts)
    ]
    port = free_port()
    extra = ["--threads", str(args.threads), "--max-batch", str(args.max_batch)]
    server = start_server(args.target, port, [*extra, "--max-wait-ms", str(args.max_wait_ms)])
    try:
        load(port, bodies[: 4 * args.concurrency], args.concurrency)  # warm-up, not measured
        before = get(port, "/health")
        latencies, errors, wall = load(port, bodies, args.concurrency)
        after = get(port, "/health")
    finally:
        server.terminate()
        server.wait(timeout=30)
    result = summarize(args, str(folder), latencies, errors, wall, before, after)
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
