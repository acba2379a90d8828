"""Activation importance: what steers 4-bit scales, measured on the float model."""

import numpy as np

from tapml.calibration import activation_importance
from tapml.convert import float_weights, gguf_sources
from tapml.gguf import GGUFFile
from tapml.models.llama import reference
from tapml.models.llama.config import LlamaConfig
from tapml.models.llama.weights import weight_map


def test_every_matrix_gets_a_positive_weight_per_input_channel(tiny_gguf):
    g = GGUFFile(tiny_gguf)
    config = LlamaConfig.from_gguf(g.metadata, g.tensor_names())
    weights = float_weights(gguf_sources(g, weight_map(config)))
    importance = activation_importance(reference.forward, weights, config, [1, 50, 700, 9])
    matrices = {n for n, w in weights.items() if w.ndim == 2}
    assert set(importance) == matrices  # the tied embedding, as the output layer, included
    for name, values in importance.items():
        assert values.shape == (weights[name].shape[1],)
        assert np.all(values > 0)
