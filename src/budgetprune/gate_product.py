"""A feature map times per-example gate values, written into the map's own buffer.

A gate sampled per example multiplies a layer's output x (N, C, ...) by z (N, C, 1, ...), and
autograd's product keeps x for the gate's gradient, ∂L/∂z = Σ g·x over the broadcast dimensions:
one more feature map alive per gated layer until the backward pass reaches it, and one more
written in the forward pass. :func:`gate_product` with ``in_place=True`` writes y = x·z into x's
buffer and keeps no copy of x: the gradient is read back from y itself,

    ∂L/∂z = Σ g·x = (Σ g·y) / z      where z > 0,          ∂L/∂x = g·z,

and taken as 0 where z = 0. No parameter misses it: every non-negative gate of the library has
a zero derivative where its value is 0 (a Hard Concrete sample is 0 where its stretched value
was clamped, and the clamp's derivative is 0 there; a purged gate is a product with 0; a
sigmoid gate is 0 only where its derivative σ(1 − σ) underflows too).

The caller guarantees what makes this exact (:func:`budgetprune.attach.in_place_gate_host`):

* x's producer does not read its own output in backward (a convolution, linear layer or
  BatchNorm; they keep their input), so x's buffer is free to overwrite;
* y's one reader is a ReLU or a ReLU6 that works in place. It overwrites y, but only where it
  passes no gradient (g = 0 there), so Σ g·y read at backward is unchanged, and it keeps y as
  its own result for backward, which is the map read here: the gates keep none of their own.

In the per-example training step of a network with in-place ReLUs (torchvision's, timm's) this
removes one feature-map write in the forward pass and one map kept for backward per gated layer
(README: "In your loop").
"""

from __future__ import annotations

import torch


class _InPlaceGateProduct(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        ctx.mark_dirty(x)
        x.mul_(z)
        ctx.save_for_backward(z)
        ctx.product = x.detach()  # an alias of y, not saved through autograd: the ReLU clips it in place
        return x

    @staticmethod
    def backward(ctx, g: torch.Tensor):
        (z,) = ctx.saved_tensors
        y = ctx.product  # kept for a second backward (retain_graph); freed with the graph
        gx = g * z if ctx.needs_input_grad[0] else None
        gz = None
        if ctx.needs_input_grad[1]:
            summed = (g * y).sum_to_size(z.shape)
            open_ = z > 0
            gz = torch.where(open_, summed / torch.where(open_, z, 1.0), 0.0)
        return gx, gz


def gate_product(x: torch.Tensor, z: torch.Tensor, in_place: bool = False) -> torch.Tensor:
    """x·z, with z broadcastable to x and z ≥ 0; ``in_place=True`` (only where the module
    docstring's conditions hold) overwrites x and saves no copy of it for backward."""
    if not in_place:
        return x * z
    if not (torch.is_grad_enabled() and (x.requires_grad or z.requires_grad)):
        return x.mul_(z)  # nothing to differentiate
    return _InPlaceGateProduct.apply(x, z)
