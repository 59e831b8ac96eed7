"""Deployment: ONNX export with a parity check, TensorRT engines, and latency benchmarks.

    model_io     the input contract (sample, timestep [B] float32, conditioning) and model loading
    onnx_export  PyTorch -> ONNX, checked against PyTorch in onnxruntime
    onnx_pipeline  a Stable Diffusion pipeline -> the folder of diffusers' OnnxStableDiffusionPipeline
    aoti         PyTorch -> AOTInductor package (.pt2), checked against PyTorch
    tensorrt     ONNX -> TensorRT engine (TensorRT 10+, imported lazily) and running one
    bench        teacher vs student latency on torch, torch.compile, AOTInductor, onnxruntime and TensorRT

Command lines: export/to_onnx.py, export/to_aoti.py, export/to_trt.py, export/bench.py.
"""

from typing import TYPE_CHECKING

from ..lazy import lazy_exports

if TYPE_CHECKING:  # the public names; at run time each is imported on first use (nni_2ndmatch.lazy)
    from .aoti import export_aoti
    from .errors import DeployError, EngineMismatchError, ExportError, MissingBackendError, ParityError
    from .model_io import InputSpec, input_specs, load_model, random_inputs, wrap
    from .onnx_export import export_onnx

__getattr__, __dir__, __all__ = lazy_exports(__name__)
