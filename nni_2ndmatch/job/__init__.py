"""The job behind the command line, callable from Python (``job.run.run_job``): its inputs, the output
folder, the prune and finetune stages, the data, the evaluation (with the baselines), the export, the
report and the model cards."""
