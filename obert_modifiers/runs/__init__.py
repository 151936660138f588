"""Running the project's pipeline: train with the stock SparseML command, export, score.

- :mod:`obert_modifiers.runs.stock`: the offline environment, the stock training command, a logged run;
- :mod:`obert_modifiers.runs.evaluate`: accuracy of an exported ``model.onnx`` (ONNX Runtime);
- :mod:`obert_modifiers.runs.logs`: third-party logs to the run's log file.

Used by ``obert demo``, ``obert train``, ``obert export``, the benchmarks and the tests. Import the
submodules; this ``__init__`` imports nothing heavy.
"""
