"""Hub download benchmark.

1. Pull throughput: ``obert_modifiers.zoo.pull`` of a ~90 MB model (cold cache: resolve, download,
   sha256 check, write to the cache and to the output folder) against a plain HTTP download of the
   same files (Python's ``http.server`` on the same machine, streamed to disk with httpx, no checks).
   Target: pull >= 80% of the plain download's throughput.
2. 32 concurrent clients, each with its own cache and output folder, pulling the same model from
   one hub process: every pull must succeed and verify.

Both servers run as subprocesses on loopback. Prints a table, writes docs/results/hub.json and the
``hub`` section of docs/results.md.

    python benchmarks/hub.py [--size-mb 90] [--clients 32] [--repeats 7]
"""

from __future__ import annotations

import argparse
import hashlib
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks._results import markdown_table, update_results_section, write_json  # noqa: E402
from obert_modifiers.testing.hub_fixtures import make_deployment  # noqa: E402
from obert_modifiers.zoo.client import pull, push, resolve  # noqa: E402
from obert_modifiers.zoo.local import free_port, local_hub  # noqa: E402

STUB = "zoo:nlp/text_classification/bench-90mb/pytorch/huggingface/synthetic/base-none"


def plain_download(base_url: str, paths: list[str], out: Path) -> None:
    with httpx.Client(timeout=120) as client:
        for rel in paths:
            target = out / rel
            target.parent.mkdir(parents=True, exist_ok=True)
            with client.stream("GET", f"{base_url}/{rel}") as response, open(target, "wb") as handle:
                response.raise_for_status()
                for chunk in response.iter_bytes(1024 * 1024):
                    handle.write(chunk)


def wait_until_up(url: str, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            httpx.get(url, timeout=1)
            return
        except httpx.HTTPError:
            time.sleep(0.1)
    raise RuntimeError(f"{url} did not start")


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--size-mb", type=float, default=90.0)
    parser.add_argument("--clients", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=7)
    args = parser.parse_args()

    work = Path(tempfile.mkdtemp(prefix="obert-hub-bench-"))
    try:
        folder = make_deployment(work / "model" / "deployment", pad_bytes=int(args.size_mb * 1e6))
        with local_hub(work / "hub") as hub:
            record = push(folder, STUB, hub.url, hub.token, progress=False)
            record = resolve(STUB, hub.url)
            paths = [f["path"] for f in record["files"]]
            total_bytes = sum(f["size"] for f in record["files"])
            expected = {f["path"]: f["sha256"] for f in record["files"]}

            # the same files, laid out the same way, behind a plain static HTTP server
            plain_root = work / "plain"
            first = pull(STUB, hub.url, out=plain_root, cache=work / "seed-cache", progress=False).parent
            port = free_port()
            static = subprocess.Popen(
                [
                    sys.executable,
                    "-m",
                    "http.server",
                    str(port),
                    "--bind",
                    "127.0.0.1",
                    "--directory",
                    str(first),
                ],
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
            )
            try:
                plain_url = f"http://127.0.0.1:{port}"
                wait_until_up(plain_url)
                pull_times, plain_times = [], []
                for repeat in range(args.repeats):
                    # paired runs, order alternated, so drifting load on a shared machine hits both alike
                    order = ("plain", "pull") if repeat % 2 == 0 else ("pull", "plain")
                    for kind in order:
                        if kind == "plain":
                            out = work / f"plain-out-{repeat}"
                            start = time.perf_counter()
                            plain_download(plain_url, paths, out)
                            plain_times.append(time.perf_counter() - start)
                            shutil.rmtree(out)
                        else:
                            start = time.perf_counter()
                            pulled = pull(
                                STUB,
                                hub.url,
                                out=work / f"pull-out-{repeat}",
                                cache=work / f"cache-{repeat}",
                                progress=False,
                            ).parent
                            pull_times.append(time.perf_counter() - start)
                            digest = hashlib.sha256(
                                (pulled / "deployment/model.onnx").read_bytes()
                            ).hexdigest()
                            assert digest == expected["deployment/model.onnx"]
                            shutil.rmtree(pulled)
                            shutil.rmtree(work / f"cache-{repeat}")
            finally:
                static.terminate()
                static.wait(10)

            pull_mbps = total_bytes / 1e6 / statistics.median(pull_times)
            plain_mbps = total_bytes / 1e6 / statistics.median(plain_times)
            ratio = pull_mbps / plain_mbps
            paired = statistics.median(p / q for p, q in zip(plain_times, pull_times, strict=True))

            # N concurrent clients, separate caches (as separate machines would have)
            def one_client(index: int) -> tuple[bool, float, str]:
                start = time.perf_counter()
                try:
                    out = pull(
                        STUB, hub.url, out=work / f"c{index}", cache=work / f"c{index}-cache", progress=False
                    ).parent
                    ok = all(
                        hashlib.sha256((out / rel).read_bytes()).hexdigest() == sha
                        for rel, sha in expected.items()
                    )
                    message = "" if ok else "checksum mismatch"
                except Exception as error:  # noqa: BLE001 - every failure is counted and reported
                    ok, message = False, f"{type(error).__name__}: {error}"
                finally:
                    shutil.rmtree(work / f"c{index}", ignore_errors=True)
                    shutil.rmtree(work / f"c{index}-cache", ignore_errors=True)
                return ok, time.perf_counter() - start, message

            start = time.perf_counter()
            with ThreadPoolExecutor(max_workers=args.clients) as pool:
                outcomes = list(pool.map(one_client, range(args.clients)))
            concurrent_wall = time.perf_counter() - start
            failures = [m for ok, _, m in outcomes if not ok]
            per_client = [t for _, t, _ in outcomes]
    finally:
        shutil.rmtree(work, ignore_errors=True)

    results = {
        "model_bytes": total_bytes,
        "files": len(paths),
        "repeats": args.repeats,
        "pull_seconds": pull_times,
        "plain_seconds": plain_times,
        "pull_MBps_median": pull_mbps,
        "plain_MBps_median": plain_mbps,
        "pull_vs_plain": ratio,
        "pull_vs_plain_paired_median": paired,
        "target_ratio": 0.8,
        "concurrent_clients": args.clients,
        "concurrent_failures": len(failures),
        "concurrent_failure_messages": failures[:5],
        "concurrent_wall_seconds": concurrent_wall,
        "concurrent_aggregate_MBps": args.clients * total_bytes / 1e6 / concurrent_wall,
        "concurrent_client_seconds_median": statistics.median(per_client),
        "concurrent_client_seconds_max": max(per_client),
        "cpu_count": os.cpu_count(),
    }
    rows = [
        [
            "obert pull (resolve + download + sha256 + cache + output)",
            f"{statistics.median(pull_times):.3f}",
            f"{pull_mbps:.1f}",
        ],
        [
            "plain HTTP download (http.server -> httpx -> file)",
            f"{statistics.median(plain_times):.3f}",
            f"{plain_mbps:.1f}",
        ],
    ]
    table = markdown_table(["download of the model", "median s", "MB/s"], rows)
    verdict = "meets" if paired >= 0.8 else "misses"
    summary = (
        f"Model: {total_bytes / 1e6:.1f} MB in {len(paths)} files, loopback, {args.repeats} repeats, "
        f"{os.cpu_count()} CPU cores (shared).\n\n{table}\n\n"
        f"Pull throughput is **{paired * 100:.0f}%** of the plain download (median of {args.repeats} paired "
        f"runs; ratio of the medians {ratio * 100:.0f}%): it {verdict} the 80% target.\n\n"
        f"{args.clients} concurrent clients (own cache each) pulled the same model from one hub process: "
        f"**{len(failures)} failures**, {concurrent_wall:.1f} s wall, "
        f"{results['concurrent_aggregate_MBps']:.0f} MB/s aggregate, "
        f"per client median {results['concurrent_client_seconds_median']:.1f} s / max "
        f"{results['concurrent_client_seconds_max']:.1f} s.\n\n"
        "Reproduce: `python benchmarks/hub.py` (writes docs/results/hub.json)."
    )
    print(summary)
    write_json("hub", results)
    update_results_section("hub", "## Hub downloads (`benchmarks/hub.py`)\n\n" + summary)
    if failures:
        sys.exit(1)


if __name__ == "__main__":
    main()
