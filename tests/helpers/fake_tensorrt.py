"""A stand-in for the ``tensorrt`` module's builder API, enough for ``build_engine`` to run on a
machine without TensorRT: the network's inputs are the ONNX graph's (a named dimension is dynamic,
-1, as TensorRT reports it), and the optimisation profile that the code sets is recorded. It tests
what this package decides from TensorRT's answers, not TensorRT."""

from __future__ import annotations

import enum
import sys
import types

import onnx


class _Tensor:
    def __init__(self, name, shape):
        self.name, self.shape, self.dtype = name, shape, "DataType.FLOAT"


class _Network:
    def __init__(self):
        self.inputs, self.outputs = [], []

    num_inputs = property(lambda self: len(self.inputs))
    num_outputs = property(lambda self: len(self.outputs))

    def get_input(self, i):
        return self.inputs[i]

    def get_output(self, i):
        return self.outputs[i]


class _Parser:
    fail_with = None  # a message: parsing fails with it

    def __init__(self, network, logger):
        self.network, self.errors = network, []

    def parse_from_file(self, path):
        if self.fail_with:
            self.errors = [self.fail_with]
            return False
        graph = onnx.load(path, load_external_data=False).graph
        initializers = {i.name for i in graph.initializer}
        for value in graph.input:
            if value.name not in initializers:
                dims = value.type.tensor_type.shape.dim
                self.network.inputs.append(_Tensor(value.name, [d.dim_value if d.HasField("dim_value") else -1
                                                                for d in dims]))
        self.network.outputs = [_Tensor(o.name, []) for o in graph.output]
        return True

    num_errors = property(lambda self: len(self.errors))

    def get_error(self, i):
        return self.errors[i]


class _Profile:
    def __init__(self):
        self.shapes = {}

    def set_shape(self, name, lo, opt, hi):
        self.shapes[name] = (list(lo), list(opt), list(hi))


class _Cache:
    def serialize(self):
        return b"cache"


class _Config:
    def __init__(self):
        self.profiles, self.flags = [], set()

    def add_optimization_profile(self, profile):
        self.profiles.append(profile)

    def set_flag(self, flag):
        self.flags.add(flag)

    def clear_flag(self, flag):
        self.flags.discard(flag)

    def set_memory_pool_limit(self, pool, size):
        pass

    def create_timing_cache(self, data):
        return _Cache()

    def set_timing_cache(self, cache, ignore_mismatch):
        return True

    def get_timing_cache(self):
        return _Cache()


class _Builder:
    built: list = []  # the profiles of every engine built, in order

    def __init__(self, logger):
        pass

    def create_network(self, flags):
        return _Network()

    def create_builder_config(self):
        return _Config()

    def create_optimization_profile(self):
        return _Profile()

    def build_serialized_network(self, network, config):
        _Builder.built.append([p.shapes for p in config.profiles])
        return b"engine"


def install(monkeypatch, version: str = "10.9.0") -> types.ModuleType:
    """Make ``import tensorrt`` give the stand-in, and torch see a GPU (named "Fake GPU")."""
    import torch

    trt = types.ModuleType("tensorrt")
    trt.__version__ = version
    trt.Logger = type("Logger", (), {"WARNING": 1, "ERROR": 2, "__init__": lambda self, level: None})
    trt.BuilderFlag = enum.Enum("BuilderFlag", ["FP16", "TF32"])
    trt.NetworkDefinitionCreationFlag = enum.Enum("NetworkDefinitionCreationFlag", ["STRONGLY_TYPED"])
    trt.MemoryPoolType = enum.Enum("MemoryPoolType", ["WORKSPACE"])
    trt.Builder, trt.OnnxParser = _Builder, _Parser
    _Builder.built, _Parser.fail_with = [], None
    monkeypatch.setitem(sys.modules, "tensorrt", trt)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda index=None: (9, 0))
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda index=None: "Fake GPU")
    return trt
