"""``obert benchmark DEPLOYMENT_DIR [--engine E]... [--batch-size] [--sequence-length] [--num-cores]
[--seconds] [--baseline DIR [--pairs N]] [--json FILE]``."""

from __future__ import annotations

import json
import math
from pathlib import Path

import typer

BENCH_HELP = (
    "Benchmark a deployment folder's model.onnx on DeepSparse (if installed) and ONNX Runtime: warm-up, "
    "then timed calls; prints median / p90 latency, throughput and the speedup against --baseline. "
    "Timings on a shared machine are indicative only (the 1-minute load average is printed)."
)


def _sequence_length_default(folder: Path) -> int:
    """export.json's sequence_length (of the folder, or of its deployment/ in a zoo layout), else 128.
    A manifest that breaks the contract is an error naming the field."""
    from obert_modifiers.deployment import MANIFEST, DeploymentManifest

    for candidate in (folder, folder / "deployment"):
        if (candidate / MANIFEST).is_file():
            return DeploymentManifest.read(candidate).sequence_length
    return 128


def _write_json(path: Path, payload: dict) -> None:
    from obert_modifiers.bench.runner import BenchmarkError
    from obert_modifiers.deployment import atomic_write_text

    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_text(path, json.dumps(payload, indent=2, default=str) + "\n")
    except OSError as error:
        raise BenchmarkError(f"cannot write --json {path}: {error.strerror or error}") from None


def register(app: typer.Typer) -> None:
    @app.command("benchmark", help=BENCH_HELP)
    def benchmark(
        deployment_dir: Path = typer.Argument(..., help="Deployment folder (holds model.onnx)"),
        engine: list[str] = typer.Option(
            ["deepsparse", "onnxruntime"],
            "--engine",
            "-e",
            help="deepsparse and/or onnxruntime (repeat the option)",
        ),
        batch_size: int = typer.Option(1, "--batch-size", "-b"),
        sequence_length: int | None = typer.Option(
            None, "--sequence-length", "-s", help="(default: export.json's sequence_length, else 128)"
        ),
        num_cores: int | None = typer.Option(None, "--num-cores", "-n", help="(default: all cores)"),
        seconds: float = typer.Option(5.0, "--seconds", "-t", help="Timed seconds per engine"),
        warmup: float = typer.Option(1.0, "--warmup", "-w", help="Warm-up seconds per engine"),
        baseline: Path | None = typer.Option(
            None, "--baseline", help="Reference deployment folder for the speedup column"
        ),
        pairs: int = typer.Option(
            0,
            "--pairs",
            help="With --baseline: also time the ORT speed-up in N pairs of back-to-back short blocks "
            "(ABBA), robust to the machine's slow spells",
        ),
        json_path: Path | None = typer.Option(
            None, "--json", help="Also write the results to this JSON file"
        ),
    ) -> None:
        from rich.console import Console
        from rich.table import Table

        from obert_modifiers.bench import run_benchmark
        from obert_modifiers.bench.runner import describe_path

        seq = sequence_length or _sequence_length_default(deployment_dir)
        kwargs = dict(
            engines=tuple(engine),
            batch_size=batch_size,
            sequence_length=seq,
            num_cores=num_cores,
            seconds=seconds,
            warmup_seconds=warmup,
        )
        from obert_modifiers.bench.runner import BenchmarkError

        if pairs < 0 or (pairs and baseline is None):
            raise BenchmarkError(f"--pairs {pairs}: give a count >= 1 together with --baseline DIR")
        if json_path is not None and json_path.is_dir():
            raise BenchmarkError(
                f"--json {json_path} is a folder; name a file, e.g. {json_path / 'bench.json'}"
            )
        results = run_benchmark(deployment_dir, **kwargs)
        base = run_benchmark(baseline, **kwargs) if baseline is not None else []
        base_by_engine = {r.engine: r for r in base if r.ok}
        base_ort = base_by_engine.get("onnxruntime")

        table = Table(title=f"{deployment_dir} (batch {batch_size}, seq {seq}, cores {num_cores or 'all'})")
        for column in ("engine", "median ms", "p90 ms", "mean ms", "items/s", "load 1m", "path"):
            table.add_column(column, justify="right" if column != "engine" else "left")
        if baseline is not None:
            table.add_column("speedup (same engine)", justify="right")
            table.add_column("speedup vs baseline ORT", justify="right")
        rows = []
        for result in results:
            if not result.ok:
                row = [result.engine, result.status, "", "", "", "", describe_path(result.path)]
                if baseline is not None:
                    row += ["", ""]
                table.add_row(*row)
                typer.secho(f"{result.engine}: {result.error}", err=True, fg="yellow")
                rows.append({**result.to_dict()})
                continue
            row = [
                result.engine,
                f"{result.median_ms:.3f}",
                f"{result.p90_ms:.3f}",
                f"{result.mean_ms:.3f}",
                f"{result.items_per_second:.1f}",
                "" if result.load_average_1m is None else f"{result.load_average_1m:.2f}",
                describe_path(result.path),
            ]
            record = result.to_dict()
            if baseline is not None:
                same = base_by_engine.get(result.engine)
                speedup = same.median_ms / result.median_ms if same else math.nan
                vs_ort = base_ort.median_ms / result.median_ms if base_ort else math.nan
                row += [f"{speedup:.2f}x", f"{vs_ort:.2f}x"]
                record.update(speedup_same_engine=speedup, speedup_vs_baseline_onnxruntime=vs_ort)
            table.add_row(*row)
            rows.append(record)
        Console(width=140).print(table)
        paired = None
        if pairs:
            from obert_modifiers.bench.runner import PAIR_BLOCK_SECONDS, paired_speedups

            paired = paired_speedups(
                baseline,
                {"candidate": deployment_dir},
                batch_size=batch_size,
                sequence_length=seq,
                num_cores=num_cores,
                pairs=pairs,
                warmup_seconds=warmup,
            )["candidate"]
            low, high = paired.quartiles
            typer.echo(
                f"paired ORT speedup vs baseline: {paired.median:.2f}x (quartiles {low:.2f}-{high:.2f}, "
                f"{pairs} pairs of {PAIR_BLOCK_SECONDS:g} s blocks)"
            )
        if json_path is not None:
            payload = {
                "deployment": str(deployment_dir),
                "baseline": str(baseline) if baseline else None,
                "results": rows,
                "baseline_results": [r.to_dict() for r in base],
                "paired_onnxruntime": paired.to_dict() if paired else None,
            }
            _write_json(json_path, payload)
            typer.echo(f"wrote {json_path}")
        if not any(r.ok for r in results):
            raise typer.Exit(1)
