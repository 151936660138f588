"""``obert export MODEL_DIR --task TASK [--sequence-length N] [--out DIR] [--overwrite]``."""

from __future__ import annotations

from pathlib import Path

import typer

EXPORT_HELP = (
    "Export a trained model folder to a DeepSparse / ONNX Runtime deployment folder (model.onnx with "
    "dynamic batch and sequence axes, config, tokenizer, recipe, export.json). QAT models export as "
    "INT8 (QuantizeLinear + MatMulInteger). The ONNX outputs are checked against PyTorch on sample "
    "sentences before the folder is written; on a mismatch nothing is written."
)


def register(app: typer.Typer) -> None:
    @app.command("export", help=EXPORT_HELP)
    def export(
        model_dir: Path = typer.Argument(
            ..., help="Trained Hugging Face model folder (config.json, weights, recipe.yaml)"
        ),
        task: str = typer.Option(
            "text-classification",
            "--task",
            "-t",
            help="text-classification, token-classification or question-answering",
        ),
        sequence_length: int = typer.Option(
            128,
            "--sequence-length",
            "-s",
            help="Sequence length of the export sample and of the parity batch padded to full length",
        ),
        out: Path | None = typer.Option(
            None, "--out", "-o", help="Deployment folder (default: MODEL_DIR/deployment)"
        ),
        overwrite: bool = typer.Option(False, "--overwrite", help="Replace an existing deployment folder"),
    ) -> None:
        from obert_modifiers.export import ExportError, export_deployment
        from obert_modifiers.runs.logs import log_beside, third_party_logs

        target = out if out is not None else model_dir / "deployment"
        try:
            with third_party_logs(log_beside(target)):
                result = export_deployment(
                    model_dir, target, task=task, sequence_length=sequence_length, overwrite=overwrite
                )
        except ExportError as error:
            typer.secho(f"obert export: {error}", err=True, fg="red")
            raise typer.Exit(1) from None
        kind = "INT8" if result.quantized else "FP32"
        typer.echo(
            f"wrote {result.path} ({kind}, {result.onnx_bytes / 1e6:.2f} MB model.onnx, "
            f"{result.num_layers} layers, sparsity {result.sparsity:.1%}); parity: max |diff| "
            f"{result.max_abs_diff:.3g} (tolerance {result.tolerance:g}), "
            f"{result.prediction_agreement:.0%} predictions agree on {result.num_samples} samples"
        )
