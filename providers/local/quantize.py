"""Weight-only int8 for the transformers engines on CPU (``quantize = "int8"``).

Every ``nn.Linear`` without a bias but the output head (the attention and MLP
projections of the common decoder architectures; the head is often tied to the input
embeddings, and a quantized copy would add memory) becomes an ``Int8Linear``: int8 weights with
one float scale per output row (symmetric, round to nearest), multiplied by torch's own
weight-only kernel ``aten._weight_int8pack_mm`` (activations stay in float): a quarter
of the float32 bytes to read. Measured on this project's avx2 machines it is slower
than float32 (0.46x for one stream) and parts from float32's greedy answers after a
few dozen tokens: docs/BENCHMARKS.md, "int8 on CPU". An opt-in, off by default.
"""

from __future__ import annotations

from typing import Any


def _int8_linear_class() -> Any:
    import torch

    class Int8Linear(torch.nn.Module):
        def __init__(self, linear: torch.nn.Linear) -> None:
            super().__init__()
            weight = linear.weight.detach().float()
            scales = weight.abs().amax(dim=1).clamp(min=1e-8) / 127.0
            self.register_buffer("weight_int8", torch.round(weight / scales[:, None]).clamp(-127, 127).to(torch.int8))
            self.register_buffer("scales", scales.to(linear.weight.dtype))
            self.in_features = linear.in_features
            self.out_features = linear.out_features

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            shape = x.shape
            flat = x.reshape(-1, shape[-1])
            if flat.dtype != self.scales.dtype:
                flat = flat.to(self.scales.dtype)
            out = torch.ops.aten._weight_int8pack_mm(flat.contiguous(), self.weight_int8, self.scales)
            return out.reshape(*shape[:-1], self.out_features)

    return Int8Linear


def quantize_int8(model: Any) -> int:
    """Replace the model's bias-free linears in place; returns how many were replaced."""
    import torch

    int8_linear = _int8_linear_class()
    head = model.get_output_embeddings()
    targets = [
        (parent, child_name, child)
        for parent in model.modules()
        for child_name, child in parent.named_children()
        if isinstance(child, torch.nn.Linear) and child.bias is None and child is not head
    ]
    for parent, child_name, child in targets:
        setattr(parent, child_name, int8_linear(child))
    return len(targets)
