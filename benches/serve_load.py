"""Load benchmark of the serving stack: N concurrent clients sending a mix of Florence-2 tasks to three servers,
run one after the other on the same machine and checkpoint:

- baseline: benches/serve_baseline_transformers.py, the FastAPI wrapper around transformers' Florence-2 that
  users write today (one request at a time);
- serve-b1: florence2-serve --max-batch-size 1 (the same server, no batching);
- serve: florence2-serve with dynamic batching (--max-batch-size, default 8).

Each client sends native requests (`POST /v1/florence2`, one image, one task) one after the other until the
run's requests are done; the tasks cycle through <CAPTION>, <OD> and <OCR_WITH_REGION>, each with a fixed
max_new_tokens (a random-weight checkpoint rarely stops early, so these stand for the answer lengths of a real
one) and 3 beams. Printed per server and client count: throughput (requests/s), p50/p99 latency, failed
requests, the batch-size histogram (florence2-serve's /metrics), and the server's RSS before and after.

    python benches/serve_load.py --model CHECKPOINT [--clients 1 --clients 4 --clients 16 --clients 64]
        [--requests 64] [--server baseline --server serve-b1 --server serve] [--dtype float32] [--threads N]

CHECKPOINT: a full-size checkpoint folder (HF-native layout), e.g. one made by
`python tests/fixtures/make_fixtures.py OUT --spec base` (OUT/base/hf). Run it with a Python that has
florence2_rs[serve] and, for the baseline, transformers + torch installed.
"""

from __future__ import annotations

import argparse
import base64
import concurrent.futures
import io
import os
import re
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import numpy as np
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
TASKS = {"<CAPTION>": 16, "<OD>": 48, "<OCR_WITH_REGION>": 64}  # task -> max_new_tokens
SERVERS = ("baseline", "serve-b1", "serve")


def images() -> list[str]:
    """Base64 PNGs of a few pictures of different sizes (scikit-image's when installed, else noise)."""
    try:
        import skimage

        arrays = [skimage.data.astronaut(), skimage.data.coffee(), skimage.data.chelsea(), skimage.data.rocket()]
    except ImportError:
        rng = np.random.default_rng(0)
        arrays = [rng.integers(0, 256, (h, w, 3), dtype=np.uint8) for h, w in ((512, 512), (400, 600), (300, 451))]
    out = []
    for array in arrays:
        buffer = io.BytesIO()
        Image.fromarray(array).save(buffer, format="PNG")
        out.append(base64.b64encode(buffer.getvalue()).decode())
    return out


def start(server: str, args: argparse.Namespace) -> tuple[subprocess.Popen, str]:
    """Starts a server on a free port; returns the process and its URL once /health answers 200."""
    threads = ["--threads", str(args.threads)] if args.threads else []
    if server == "baseline":
        command = [sys.executable, str(ROOT / "benches" / "serve_baseline_transformers.py"), "--model", args.model,
                   "--port", "0", "--dtype", args.dtype, *threads]
    else:
        batch = "1" if server == "serve-b1" else str(args.max_batch_size)
        command = [sys.executable, "-m", "florence2_rs.serve", "--model", args.model, "--port", "0",
                   "--dtype", args.dtype, "--max-batch-size", batch, "--max-queue", "1024", *threads]
    proc = subprocess.Popen(command, stdout=subprocess.PIPE, text=True)
    line = proc.stdout.readline()
    match = re.search(r"listening on (http://\S+)", line)
    if not match:
        proc.kill()
        raise RuntimeError(f"{server} did not start: {line!r}")
    url = match.group(1)
    deadline = time.monotonic() + 600
    while time.monotonic() < deadline:
        try:
            if httpx.get(url + "/health", timeout=5).status_code == 200:
                return proc, url
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    proc.kill()
    raise RuntimeError(f"{server} never became healthy")


def rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def batch_histogram(url: str) -> dict[str, float]:
    """florence2_batch_size's cumulative buckets from /metrics (empty for the baseline)."""
    try:
        text = httpx.get(url + "/metrics", timeout=10).text
    except httpx.HTTPError:
        return {}
    buckets = {}
    for match in re.finditer(r'florence2_batch_size_bucket\{le="([^"]+)"\} ([0-9.e+]+)', text):
        buckets[match.group(1)] = float(match.group(2))
    return buckets


def histogram_delta(before: dict[str, float], after: dict[str, float]) -> str:
    """Batches per size range between two cumulative snapshots, as `size<=le: count`."""
    if not after:
        return "-"
    parts, previous = [], 0.0
    for le, total in after.items():
        count = total - before.get(le, 0.0)
        if count - previous > 0:
            parts.append(f"<={le.replace('.0', '')}: {int(count - previous)}")
        previous = count
    return ", ".join(parts) or "-"


def run_load(url: str, clients: int, requests: int, pictures: list[str]) -> dict:
    """`requests` requests from `clients` concurrent clients; latencies and failures."""
    counter = iter(range(requests))
    lock = threading.Lock()
    latencies, failures = [], []
    tasks = list(TASKS)

    def client() -> None:
        with httpx.Client(timeout=3600) as http:
            while True:
                with lock:
                    i = next(counter, None)
                if i is None:
                    return
                task = tasks[i % len(tasks)]
                body = {"image": pictures[i % len(pictures)], "tasks": [task], "max_new_tokens": TASKS[task],
                        "num_beams": 3}
                start = time.perf_counter()
                try:
                    response = http.post(url + "/v1/florence2", json=body)
                    ok = response.status_code == 200
                except httpx.HTTPError as err:
                    ok, response = False, err
                elapsed = time.perf_counter() - start
                with lock:
                    (latencies if ok else failures).append(elapsed if ok else str(response)[:200])

    start = time.perf_counter()
    with concurrent.futures.ThreadPoolExecutor(clients) as pool:
        for future in [pool.submit(client) for _ in range(clients)]:
            future.result()
    wall = time.perf_counter() - start
    latencies.sort()
    return {"wall": wall, "done": len(latencies), "failed": len(failures), "failures": failures[:3],
            "throughput": len(latencies) / wall,
            "p50": statistics.median(latencies) if latencies else float("nan"),
            "p99": latencies[min(len(latencies) - 1, int(0.99 * len(latencies)))] if latencies else float("nan")}


def cpu_name() -> str:
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True).stdout
    except OSError:
        return "unknown CPU"
    fields = dict(line.split(":", 1) for line in out.splitlines() if ":" in line)
    name = fields.get("Model name", "unknown").strip()
    family = fields.get("CPU family", "?").strip()
    return f"{name} (CPU family {family}), {os.cpu_count()} CPUs"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", required=True, help="checkpoint folder (HF-native layout)")
    parser.add_argument("--clients", type=int, action="append", help="default: 1, 4, 16, 64")
    parser.add_argument("--requests", type=int, default=64, help="requests per client count (default: 64)")
    parser.add_argument("--server", action="append", choices=SERVERS, help="default: all three")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    parser.add_argument("--threads", type=int, help="threads of each server's model (default: all cores)")
    parser.add_argument("--max-batch-size", type=int, default=8)
    parser.add_argument("--warmup", type=int, default=len(TASKS),
                        help="requests sent to each server before the timed rows (default: one per task)")
    args = parser.parse_args()
    clients = args.clients or [1, 4, 16, 64]
    pictures = images()
    print(f"# {cpu_name()}; {args.dtype}; {args.requests} requests per row after {args.warmup} warm-up; tasks "
          + ", ".join(f"{t} ({n} new tokens)" for t, n in TASKS.items()) + "; 3 beams", flush=True)
    print("| server | clients | requests/s | p50 (s) | p99 (s) | failed | batch sizes | RSS before/after (MiB) |")
    print("|---|---:|---:|---:|---:|---:|---|---|")
    for server in args.server or SERVERS:
        proc, url = start(server, args)
        try:
            # Warm-up requests (by default one per task), so that first-call costs are not in the first row.
            if args.warmup:
                run_load(url, 1, args.warmup, pictures)
            for count in clients:
                before_rss, before_hist = rss_mib(proc.pid), batch_histogram(url)
                result = run_load(url, count, args.requests, pictures)
                after_rss, after_hist = rss_mib(proc.pid), batch_histogram(url)
                print(f"| {server} | {count} | {result['throughput']:.3f} | {result['p50']:.2f} | {result['p99']:.2f} "
                      f"| {result['failed']} | {histogram_delta(before_hist, after_hist)} "
                      f"| {before_rss:.0f} / {after_rss:.0f} |", flush=True)
                for failure in result["failures"]:
                    print(f"  failure: {failure}", file=sys.stderr)
        finally:
            proc.terminate()
            try:
                proc.wait(60)
            except subprocess.TimeoutExpired:
                proc.kill()


if __name__ == "__main__":
    main()
