"""``obert export MODEL_DIR --task TASK [--sequence-length N] [--out DIR] [--overwrite]``."""

from __future__ import annotations

from pathlib import Path

import typer

EXPORT_HELP = (
    "Export a trained model folder to a DeepSparse / ONNX Runtime deployment folder (model.onnx with "
    "dynamic batch and sequence axes, config, tokenizer, recipe, export.json). QAT models export as "
    "INT8 in the fastest form that matches PyTorch on this CPU (--int8-format). The ONNX outputs are "
    "checked against PyTorch on sample "
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
        sequence_length: int | None = typer.Option(
            None,
            "--sequence-length",
            "-s",
            help=(
                "Sequence length of the export sample and of the parity batch padded to full length "
                "(default: 128, or the model's maximum if it takes fewer tokens)"
            ),
        ),
        out: Path | None = typer.Option(
            None, "--out", "-o", help="Deployment folder (default: MODEL_DIR/deployment)"
        ),
        overwrite: bool = typer.Option(False, "--overwrite", help="Replace an existing deployment folder"),
        int8_format: str = typer.Option(
            "auto",
            "--int8-format",
            help=(
                "INT8 form of a QAT model: auto (the fastest that passes the parity check with an exact "
                "integer kernel on this CPU), ort (ORT's UINT8 x INT8 GEMM; exact with VNNI), ort-u8 "
                "(UINT8 weights; exact on any x86 CPU), integer (SparseML's MatMulInteger graph, "
                "DeepSparse's INT8 path) or qdq. export.json records the choice and why"
            ),
        ),
    ) -> None:
        from obert_modifiers.export import DEFAULT_SEQUENCE_LENGTH, export_deployment, max_sequence_length
        from obert_modifiers.runs.logs import log_beside, third_party_logs

        target = out if out is not None else model_dir / "deployment"
        if sequence_length is None:
            maximum = max_sequence_length(model_dir)
            if maximum is not None and maximum < DEFAULT_SEQUENCE_LENGTH:
                typer.echo(
                    f"{model_dir} takes at most {maximum} tokens (max_position_embeddings): exporting with "
                    f"--sequence-length {maximum} instead of {DEFAULT_SEQUENCE_LENGTH}"
                )
        # errors (ExportError, DeploymentError: both ObertError) are printed by the `obert` handler;
        # what SparseML, transformers and ONNX log goes to the log file beside the folder
        with third_party_logs(log_beside(target)):
            result = export_deployment(
                model_dir,
                target,
                task=task,
                sequence_length=sequence_length,
                overwrite=overwrite,
                int8_format=int8_format,
            )
        kind = f"INT8 {result.int8_format}" if result.quantized else "FP32"
        typer.echo(
            f"wrote {result.path} ({kind}, {result.onnx_bytes / 1e6:.2f} MB model.onnx, "
            f"sequence length {result.sequence_length}, "
            f"{result.num_layers} layers, sparsity {result.sparsity:.1%}); parity: max |diff| "
            f"{result.max_abs_diff:.3g} (tolerance {result.tolerance:g}), "
            f"{result.prediction_agreement:.0%} predictions agree on {result.num_samples} samples"
        )
