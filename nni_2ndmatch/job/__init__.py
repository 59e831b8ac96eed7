"""A job's stages: data, prune, finetune, report (the command line's jobs, callable from Python)."""
