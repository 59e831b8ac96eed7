"""Deployment: ONNX export with a parity check, TensorRT engines, and latency benchmarks.

    model_io     the input contract (sample, timestep [B] float32, conditioning) and model loading
    onnx_export  PyTorch -> ONNX, checked against PyTorch in onnxruntime
    onnx_pipeline  a Stable Diffusion pipeline -> the folder of diffusers' OnnxStableDiffusionPipeline
    aoti         PyTorch -> AOTInductor package (.pt2), checked against PyTorch
    tensorrt     ONNX -> TensorRT engine (TensorRT 10+, imported lazily) and running one
    bench        teacher vs student latency on torch, torch.compile, AOTInductor, onnxruntime and TensorRT

Command lines: export/to_onnx.py, export/to_aoti.py, export/to_trt.py, export/bench.py.
"""

from .aoti import export_aoti
from .errors import (
    DeployError,
    EngineMismatchError,
    ExportError,
    MissingBackendError,
    ParityError,
)
from .model_io import InputSpec, input_specs, load_model, random_inputs, wrap
from .onnx_export import export_onnx

__all__ = [
    "DeployError", "EngineMismatchError", "ExportError", "InputSpec", "MissingBackendError", "ParityError",
    "export_aoti", "export_onnx", "input_specs", "load_model", "random_inputs", "wrap",
]
