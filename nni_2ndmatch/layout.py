"""The files and folders of a run's ``output_dir``, each named once."""

CONFIG_FILE = "config.yaml"  # the resolved config
PRUNED_DIR = "pruned"  # the student before finetuning
PRUNING_REPORT = "pruning_report.json"
CHECKPOINT_DIR = "checkpoints"  # step-NNNNNNN/{CHECKPOINT_TENSORS, CHECKPOINT_META} and a `latest` pointer
CHECKPOINT_TENSORS, CHECKPOINT_META = "state.safetensors", "state.json"
METRICS_FILE = "metrics.jsonl"  # one line per logged step
LOGS_DIR = "logs"  # the trackers' (finetune.report_to), e.g. TensorBoard's event files
SAMPLES_DIR = "samples"  # validation grids during training: teacher.png, step-NNNNNN.png
STUDENT_DIR = "student"  # the finetuned student
PIPELINE_DIR = "pipeline"  # the teacher's pipeline with the student in it
SUMMARY_FILE = "summary.json"
CACHE_DIR = "cache"  # a latent pipeline's encoded data (and a parquet source's mapped copy)
REPORT_DIR = "report"  # REPORT_FILE, RESULTS_FILE, the PNGs, BASELINES_DIR
REPORT_FILE, RESULTS_FILE = "report.md", "results.json"
BASELINES_DIR = "baselines"
ONNX_DIR = "onnx"  # the run's export: teacher.onnx, student.onnx

#: What a folder holds once a run has started in it: with any of them present, a new run must be
#: told to resume or to overwrite (and an overwrite removes them).
RUN_MARKERS = (CHECKPOINT_DIR, METRICS_FILE, SUMMARY_FILE)
