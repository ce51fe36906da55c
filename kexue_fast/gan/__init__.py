"""The GAN toolkit (docs/gan.md): the techniques of the four GAN posts among the seeds.

* :mod:`kexue_fast.gan.batch_norm` — BatchNorm with per-sample γ, β from the noise (SELF-MOD)
  or the label (conditional BN), on ``kexue::modulated_batch_norm``;
* :mod:`kexue_fast.gan.cascading` — Cascading Rejection: the scores, their loss, a D head;
* :mod:`kexue_fast.gan.orthogonality` — the Self-Orthogonality Module and BigGAN's
  orthogonal regulariser over many weights in one call;
* :mod:`kexue_fast.gan.penalties` — the zero-centred gradient penalty and the L2 of D's weights;
* :mod:`kexue_fast.gan.dirac` — the 2-D Dirac-GAN dynamics of the GAN-dynamics post.
"""

from kexue_fast.gan import dirac
from kexue_fast.gan.batch_norm import ConditionalBatchNorm2d, SelfModulatedBatchNorm2d
from kexue_fast.gan.cascading import CascadingRejectionHead, cascading_rejection, cascading_rejection_loss
from kexue_fast.gan.orthogonality import SelfOrthogonality, orthogonal_regularizer, self_orthogonality
from kexue_fast.gan.penalties import weight_l2, zero_centered_gradient_penalty

__all__ = [
    "CascadingRejectionHead", "ConditionalBatchNorm2d", "SelfModulatedBatchNorm2d", "SelfOrthogonality",
    "cascading_rejection", "cascading_rejection_loss", "dirac", "orthogonal_regularizer", "self_orthogonality",
    "weight_l2", "zero_centered_gradient_penalty",
]  # fmt: skip
