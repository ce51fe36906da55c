r"""Penalties on the discriminator that make GAN training converge locally (docs/gan.md;
kexue.fm/archives/6583): the zero-centred gradient penalty on D's input gradient (R1 / WGAN-div) and
the L2 norm of D's parameters. Both are added to D's loss, with a weight the user chooses.
"""

from __future__ import annotations

import torch

from kexue_fast import _checks


def zero_centered_gradient_penalty(D, x: torch.Tensor, power: float = 2.0, return_scores: bool = False):
    r"""``mean_b ‖∇_x D(x)_b‖^p``: the zero-centred gradient penalty (R1 on real samples with ``p = 2``;
    WGAN-div's ``‖∇‖^p`` with its ``p = 6`` on samples between real and fake), by double backprop.

    Args:
        D: the discriminator, a callable (``nn.Module``) mapping the batch ``x`` to its scores:
            ``(B,)``, ``(B, 1)`` or ``(B, N)`` — several scores per sample (the N stages of
            Cascading Rejection) are summed, so the gradient is that of the sample's total score.
            ``∇_x D(x)_b`` is the gradient of the sum of all scores with respect to ``x_b``: it is
            sample ``b``'s own gradient only if D treats the samples independently (no BatchNorm in
            training mode, no minibatch statistics).
        x: the batch ``(B, ...)``, floating point. It is detached: the penalty's gradient goes to
            D's parameters, not back into whatever made ``x`` (a generator).
        power: ``p``, a finite number ``>= 1`` (for ``p = 2`` the squared norm is summed directly).
        return_scores: also return ``D(x)`` (of the detached ``x``), to reuse the forward in D's loss.

    Returns:
        The penalty, a 0-d tensor (float32 for 16-bit ``x``; 0 for an empty batch) that
        backpropagates into D's parameters (``create_graph=True``); with ``return_scores``, the
        pair ``(penalty, scores)``.

    Raises:
        TypeError: ``D`` not callable, ``x`` not a floating-point Tensor. ValueError: ``power`` not
        a finite number ``>= 1``, or D's output not ``(B,)``/``(B, N)`` for ``x``'s ``B`` rows.
    """
    op = "zero_centered_gradient_penalty"
    _checks.branch_and_rows(op, D, "x", x)
    _checks.number(op, "power", power, float32=False)
    if power < 1:
        raise ValueError(f"{op}: power must be >= 1, got {power}")
    x = x.detach().requires_grad_()
    scores = D(x)
    _checks.tensor(op, "D(x)", scores)
    if scores.dim() not in (1, 2) or scores.shape[0] != x.shape[0]:
        raise ValueError(f"{op}: D(x) must have shape (B,) or (B, N) with B = {x.shape[0]} (x's rows), got "
                         f"{tuple(scores.shape)}")  # fmt: skip
    (grad,) = torch.autograd.grad(scores.sum(), x, create_graph=True)
    grad = grad.flatten(1).to(torch.float64 if grad.dtype == torch.float64 else torch.float32)
    per_sample = grad.square().sum(1) if power == 2 else torch.linalg.vector_norm(grad, dim=1).pow(power)
    penalty = per_sample.sum() / max(x.shape[0], 1)
    return (penalty, scores) if return_scores else penalty


def weight_l2(D) -> torch.Tensor:
    r"""``Σ_θ ‖θ‖²`` over every parameter of ``D`` that requires grad — weights, biases and
    normalisation gains alike: the ``λ‖φ‖²`` of docs/gan.md's Penalties (weight decay on the whole of D,
    as torch's optimizers apply ``weight_decay`` to every parameter by default).

    Args:
        D: an ``nn.Module``, or an iterable of Tensors (only those that require grad count), all on
            one device.

    Returns:
        A 0-d tensor, float32 (float64 if a parameter is; 16-bit parameters are summed in float32),
        differentiable in the parameters (its gradient is ``2θ``); 0 if there are none.

    Raises:
        TypeError: ``D`` neither an ``nn.Module`` nor an iterable of Tensors.
    """
    op = "weight_l2"
    params = D.parameters() if isinstance(D, torch.nn.Module) else D
    if isinstance(params, torch.Tensor):
        raise TypeError(f"{op}: D must be an nn.Module or an iterable of Tensors, got one Tensor (wrap it: [p])")
    try:
        params = list(params)
    except TypeError:
        raise TypeError(f"{op}: D must be an nn.Module or an iterable of Tensors, got {type(D).__name__}") from None
    for i, p in enumerate(params):
        _checks.tensor(op, f"parameters[{i}]", p)
    params = [p for p in params if p.requires_grad]
    if not params:
        return torch.zeros(())
    sums = [p.to(torch.float64 if p.dtype == torch.float64 else torch.float32).square().sum() for p in params]
    return sum(sums[1:], sums[0])
