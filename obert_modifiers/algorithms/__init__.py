"""Pure-torch algorithms (no SparseML import here): Fisher inverse, OBS scores and updates, masks
and schedules, layer selection, distillation losses, QAT helpers."""
