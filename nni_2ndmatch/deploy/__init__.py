"""Deployment: ONNX export with a parity check, TensorRT engines, and latency benchmarks.

    model_io     the input contract (sample, timestep [B] float32, conditioning) and model loading
    onnx_export  PyTorch -> ONNX, checked against PyTorch in onnxruntime
    onnx_pipeline  a Stable Diffusion pipeline -> the folder of diffusers' OnnxStableDiffusionPipeline
    aoti         PyTorch -> AOTInductor package (.pt2), checked against PyTorch
    tensorrt     ONNX -> TensorRT engine (TensorRT 10+, imported lazily) and running one
    bench        teacher vs student latency on torch, torch.compile, AOTInductor, onnxruntime and TensorRT

Command lines: export/to_onnx.py, export/to_aoti.py, export/to_trt.py, export/bench.py.
"""

from ..lazy import lazy_exports

_EXPORTS = {
    "export_aoti": ".aoti",
    **dict.fromkeys(["DeployError", "EngineMismatchError", "ExportError", "MissingBackendError", "ParityError"],
                    ".errors"),
    **dict.fromkeys(["InputSpec", "input_specs", "load_model", "random_inputs", "wrap"], ".model_io"),
    "export_onnx": ".onnx_export",
}
__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)
__all__ = sorted(_EXPORTS)
