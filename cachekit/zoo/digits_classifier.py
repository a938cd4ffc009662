"""Which digit an image shows: the recognition check of the digits model.

An RBF SVM on 8x8 area-pooled grey pixels (`digits_data.downsample_for_classifier`), trained ONLY on the held-out
split, so it has never seen a training image of the digits pipeline; about 98% accurate on the (unseen) train split.
`benchmarks/digits_model.py` reports the model's recognition rate with it, and the CLI tests check that
`cachekit generate` draws the prompted digit.

    digits = recognise(images)   # images: [N, 3, H, W] uint8 or float in 0..1, any size (pooled to 8x8)
"""

from __future__ import annotations

import functools
from typing import Any

import numpy as np
import torch

from .digits_data import downsample_for_classifier, load_split

__all__ = ["heldout_classifier", "classifier_accuracy", "recognise"]


@functools.lru_cache(maxsize=1)
def heldout_classifier() -> Any:
    """The scikit-learn SVC fitted on the held-out digits (deterministic; built once per process, in about 0.1 s)."""
    from sklearn.svm import SVC

    held, held_y = load_split("heldout")
    return SVC(C=10.0, gamma="scale").fit(downsample_for_classifier(held).numpy(), held_y.numpy())


def classifier_accuracy(classifier: Any = None) -> float:
    """Accuracy on the train split, which the classifier never saw (a sanity check of the classifier itself)."""
    classifier = classifier if classifier is not None else heldout_classifier()
    train, train_y = load_split("train")
    return float((recognise(train, classifier) == train_y.numpy()).mean())


def recognise(images: torch.Tensor, classifier: Any = None) -> np.ndarray:
    """The digit each of `images` (`[N, 3, H, W]`, uint8 or float in 0..1) shows, as an `[N]` int array."""
    classifier = classifier if classifier is not None else heldout_classifier()
    return np.asarray(classifier.predict(downsample_for_classifier(images).numpy()), dtype=np.int64)
