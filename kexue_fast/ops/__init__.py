"""The ``torch.ops.kexue.*`` custom ops, one module per op family; importing registers them all.

* :mod:`kexue_fast.ops.cond_layer_norm` — ``kexue::cond_layer_norm`` (docs/cond_layer_norm.md)
* :mod:`kexue_fast.ops.spectral_norm` — ``kexue::spectral_norm_power_iter_``, ``kexue::spectral_sigma``
  (docs/spectral_norm.md)
* :mod:`kexue_fast.ops.langevin` — ``kexue::philox_normal``, ``kexue::langevin_step_`` (docs/langevin.md)
* :mod:`kexue_fast.ops.ema_update` — ``kexue::ema_update_`` (docs/ema.md)
* :mod:`kexue_fast.ops.iresnet` — ``kexue::iresnet_inverse``, ``kexue::iresnet_inverse_backward`` (docs/iresnet.md)
* :mod:`kexue_fast.ops.iresnet_logdet` — ``kexue::iresnet_mlp_logdet`` (docs/iresnet_flow.md)
* :mod:`kexue_fast.ops.modulated_batch_norm` — ``kexue::modulated_batch_norm`` and the three ops it is
  made of (docs/gan.md)
* :mod:`kexue_fast.ops.cascading_rejection` — ``kexue::cascading_rejection`` (docs/gan.md)
* :mod:`kexue_fast.ops.self_orthogonality` — ``kexue::self_orthogonality``, ``kexue::self_orthogonality_backward``
  (docs/gan.md)

This package exposes the modules only. The Python functions that call the ops live at the top level
(``kexue_fast.cond_layer_norm``, ``kexue_fast.ema_update_``, ...); each module also defines its own.
"""

from kexue_fast.ops import (
    cascading_rejection,
    cond_layer_norm,
    ema_update,
    iresnet,
    iresnet_logdet,
    langevin,
    modulated_batch_norm,
    self_orthogonality,
    spectral_norm,
)

__all__ = [
    "cascading_rejection", "cond_layer_norm", "ema_update", "iresnet", "iresnet_logdet", "langevin",
    "modulated_batch_norm", "self_orthogonality", "spectral_norm",
]  # fmt: skip
