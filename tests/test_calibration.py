"""Activation importance: what steers 4-bit scales, measured on the float model."""

import numpy as np

from tapml.calibration import activation_importance
from tapml.compiler import load_model_file


def test_every_matrix_gets_a_positive_weight_per_input_channel(tiny_gguf):
    model = load_model_file(tiny_gguf)
    weights, config = model.float_weights(), model.config
    importance = activation_importance(model.architecture.reference, weights, config,
                                       [1, 50, 700, 9])  # fmt: skip
    matrices = {n for n, w in weights.items() if w.ndim == 2}
    assert set(importance) == matrices  # the tied embedding, as the output layer, included
    for name, values in importance.items():
        assert values.shape == (weights[name].shape[1],)
        assert np.all(values > 0)
