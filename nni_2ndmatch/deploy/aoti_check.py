"""The child process of an AOTInductor parity check (``deploy.aoti.run_in_child``): load a package,
run it on the saved inputs of each batch, save its outputs.

    python -m nni_2ndmatch.deploy.aoti_check PACKAGE INPUTS.safetensors OUTPUTS.safetensors DEVICE

Inputs are named "<batch>.<position>"; outputs "<batch>", on the CPU.
"""

from __future__ import annotations

import sys


def main(argv: list[str]) -> int:
    import torch

    from ..files import load_tensors, save_tensors

    package_path, inputs_path, outputs_path, device = argv
    package = torch._inductor.aoti_load_package(package_path)
    inputs = load_tensors(inputs_path)
    outputs = {}
    for batch in sorted({key.split(".")[0] for key in inputs}, key=int):
        args = [inputs[f"{batch}.{i}"].to(device) for i in range(sum(k.startswith(f"{batch}.") for k in inputs))]
        with torch.inference_mode():
            outputs[batch] = package(*args).float().cpu()
    save_tensors(outputs_path, outputs)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
