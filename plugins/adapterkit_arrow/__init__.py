"""adapterkit's Arrow plugin: zero-shot, per-token routing over a library of LoRA experts.

Arrow (Ostapenko et al. 2024, "Towards Modular LLMs by Building and Reusing a Library of
LoRAs"; PEFT's ``ArrowConfig``/``create_arrow_model``): per layer and expert, the prototype
is the top right singular vector of the expert's update ``ΔW``; each token ``h`` scores every
expert by ``|<h, prototype>|``, keeps the ``top_k`` best, weighs them by a softmax with a
temperature, and its output is the base output plus the weighted sum of those experts'
LoRA outputs. GenKnowSub (Bagherifard et al. 2025) first subtracts the mean of general
adapters from every expert.

- router ``arrow`` (:class:`ArrowRouter`): the per-token weights (``Router.needs_inputs``);
- :func:`arrow`: a library selection (or URLs) stacked onto a base model under that router,
  its prototypes read from the library (:class:`PrototypeStore`), only missing ones computed;
- :func:`top_right_singular_vectors`: the prototypes, exactly, without forming ``ΔW``.

See ``docs/methods/arrow.md``.
"""

from __future__ import annotations

from adapterkit.plugin_api import Registry, Router, hookimpl

from .build import arrow, compute_prototypes
from .prototypes import subtract_general, top_right_singular_vectors
from .router import ArrowRouter, NotReady
from .store import FOLDER, PrototypeStore, UpdateReport

__all__ = [
    "FOLDER",
    "ArrowRouter",
    "NotReady",
    "PrototypeStore",
    "UpdateReport",
    "arrow",
    "compute_prototypes",
    "subtract_general",
    "top_right_singular_vectors",
]


@hookimpl
def adapterkit_register_routers(registry: Registry[Router]) -> None:
    registry.add("arrow", ArrowRouter)
