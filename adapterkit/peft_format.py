"""The contract of a PEFT format plugin: :class:`PeftFormat` (registered by ``peft_type``
through ``adapterkit_register_peft_formats``) and its error; the folder handling and the
dispatch are in :mod:`adapterkit.peft_interop`."""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from torch import Tensor

from .errors import AdapterkitError

if TYPE_CHECKING:
    from .site import AdapterSite

# fields that carry no math (provenance, init, target resolution already done in the file);
# ``modules_to_save`` is read here, for every format
IGNORED = frozenset({
    "auto_mapping", "base_model_name_or_path", "revision", "peft_version", "task_type", "inference_mode",
    "init_weights", "init_lora_weights", "target_modules", "exclude_modules", "layers_to_transform",
    "layers_pattern", "megatron_core", "qalora_group_size", "peft_type", "modules_to_save",
})


class PeftInteropError(AdapterkitError):
    """A PEFT adapter cannot be imported (or ours exported) without changing its math."""


class PeftFormat:
    """One PEFT adapter type (its ``peft_type``), as a plugin registers it.

    Import: the core groups the file's tensors by module with :attr:`suffixes`, then
    :meth:`from_peft` gives the recipe and our tensors. Export: the format that
    :meth:`owns` every site writes them with :meth:`to_peft`. The core handles the
    folder, the key prefix, ``modules_to_save`` and the fields in :data:`IGNORED`.
    """

    fields: frozenset[str] = frozenset()  # config fields the format reproduces (others must be empty)
    suffixes: tuple[str, ...] = ()  # the tensor names after ``<module>.`` (``lora_A.weight``, ...)

    def check(self, config: Mapping[str, Any]) -> None:
        """Refuse (:class:`PeftInteropError`) a value of :attr:`fields` that would change the math."""

    def from_peft(
        self, config: Mapping[str, Any], modules: Mapping[str, Mapping[str, Tensor]]
    ) -> tuple[dict[str, Any], dict[str, Tensor]]:
        """The recipe (as a dict) and tensors (keys ``<module>.<site key>``) of the adapter
        ``modules`` (``{module: {suffix: tensor}}``; a module lacking a tensor is the
        format's error to raise)."""
        raise NotImplementedError

    def owns(self, site: AdapterSite) -> bool:
        """Whether this format exports ``site`` (an unsplit site; it may still refuse it)."""
        raise NotImplementedError

    def to_peft(self, found: Mapping[str, AdapterSite]) -> tuple[dict[str, Any], dict[str, Tensor]]:
        """The config fields (``peft_type`` and the common ones are added) and the tensors
        (keys ``<module>.<suffix>``) of sites this format owns."""
        raise NotImplementedError


def empty(value: Any) -> bool:
    """Whether a PEFT config value means "feature unused"."""
    return value is None or value is False or value == "none" or (isinstance(value, (dict, list, str)) and not value)
