"""The stages of a job that ``pipeline`` runs beside pruning and finetuning: the data, the evaluation (with the
baselines) and the export, and the typed results they hand to the report."""
