"""``digits``: scikit-learn's handwritten digits (1,797 8x8 images, 10 classes), bundled."""

from __future__ import annotations

from typing import Any

import attrs
import numpy as np

from adapterkit.plugin_api import AdapterkitError, Dataset, Example, Split

from .split import fraction, stratified_split


class Digits(Dataset):
    """A stratified, seeded train/test split of ``sklearn.datasets.load_digits``."""

    modality = "image"

    @attrs.frozen
    class Config:
        test_fraction: float = attrs.field(default=0.2, validator=fraction)
        seed: int = 0

    def __init__(self, config: Any = None) -> None:
        super().__init__(config)
        self._cache: dict[str, list[Example]] | None = None

    def classes(self) -> list[str]:
        return [str(i) for i in range(10)]

    def examples(self, split: Split) -> list[Example]:
        if self._cache is None:
            try:
                from sklearn.datasets import load_digits
            except ImportError:
                raise AdapterkitError("dataset 'digits' needs scikit-learn: pip install 'adapterkit[models]'") from None
            data = load_digits()
            images = np.asarray(data.images, dtype=np.float32) / 16.0
            labels = [str(int(t)) for t in data.target]
            train, test = stratified_split(labels, self.config.test_fraction, self.config.seed)
            self._cache = {
                "train": [Example(label=labels[i], image=images[i]) for i in train],
                "test": [Example(label=labels[i], image=images[i]) for i in test],
            }
        return list(self._cache[split])
