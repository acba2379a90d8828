"""A model's weights, from its source file into the formats its plan reads.

An architecture's weight map (`tapml.models.architecture.WeightMap`) names, for each of
tapml's weights, the source tensors it is made of, stacked by rows. Matrices are stored in
the format the quantization scheme gives each part (`Quantization.formats`); vectors (norms,
biases) in the activations' dtype.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import numpy as np

from .errors import WeightsError
from .formats import WeightFormat
from .gguf import GGUFFile
from .models.architecture import WeightMap
from .quantization import Quantization, format_names, part_prefixes
from .safetensors_file import SafetensorsFile
from .source import SourceTensor

Sources = dict[str, list[SourceTensor]]


def file_sources(file: GGUFFile | SafetensorsFile, weight_map: Mapping[str, Sequence[str]]
                 ) -> Sources:  # fmt: skip
    """Each weight's source tensors in the model file; a missing one is named."""
    present = set(file.tensor_names())
    missing = [f"{theirs} (for {ours})" for ours, parts in weight_map.items()
               for theirs in parts if theirs not in present]  # fmt: skip
    if missing:
        raise WeightsError(
            f"{file.path} lacks {len(missing)} tensors the model needs: {', '.join(missing[:4])}"
        )
    return {ours: [file.source(t) for t in parts] for ours, parts in weight_map.items()}


def stored_types(matrices: Sources) -> dict[str, tuple[str, ...]]:
    """Per matrix: the stored type of each part (what `Quantization.formats` resolves)."""
    return {name: tuple(p.stored for p in parts) for name, parts in matrices.items()}


def float_weights(sources: Sources, weight_map: WeightMap) -> dict[str, np.ndarray]:
    """Every weight as float32 (parts stacked), matrices as `{name}.weight`: what the
    architecture's reference forward pass reads."""
    out = {f"{name}.weight": _stacked(name, sources[name]).float32()
           for name in weight_map.matrices}  # fmt: skip
    out.update({name: _stacked(name, sources[name]).float32() for name in weight_map.vectors})
    return out


def convert(
    sources: Sources,
    weight_map: WeightMap,
    quant: Quantization,
    formats: Mapping[str, Sequence[WeightFormat]],
    importance: Mapping[str, np.ndarray] | None = None,
) -> Iterator[tuple[str, np.ndarray]]:
    """(parameter name, array) for every plane of every weight, one weight at a time.

    `importance` (`{name}.weight` -> per-input-channel weights) steers tapml's own 4-bit scales.
    """
    for name in weight_map.vectors:
        yield name, _stacked(name, sources[name]).float32().astype(quant.dtype)
    for name in weight_map.matrices:
        parts = sources[name]
        fmts = formats[name]
        prefixes = part_prefixes(name, fmts)
        groups = [parts] if len(prefixes) == 1 else [[p] for p in parts]
        for prefix, fmt, group in zip(prefixes, fmts, groups, strict=False):
            tensor = _stacked(prefix, group)
            weight = (importance or {}).get(f"{name}.weight") if len(prefixes) == 1 else None
            for plane, array in fmt.encode(tensor, weight).items():
                yield f"{prefix}.{plane}", array


def _stacked(name: str, parts: list[SourceTensor]) -> SourceTensor:
    return parts[0] if len(parts) == 1 else SourceTensor.stack(name, parts)


def weight_summary(sources: Sources, formats: Mapping[str, Sequence[WeightFormat]]
                   ) -> dict[str, Any]:  # fmt: skip
    """What an artifact's config says of its weights: each matrix's format (per part), and
    per format the matrices (parts), parameters and stored bytes it holds."""
    totals: dict[str, dict[str, int]] = {}
    for name, fmts in formats.items():
        for part, fmt in zip(sources[name], fmts, strict=True):
            entry = totals.setdefault(fmt.name, {"matrices": 0, "parameters": 0, "bytes": 0})
            entry["matrices"] += 1
            entry["parameters"] += int(np.prod(part.shape))
            entry["bytes"] += fmt.nbytes(part.shape)
    return {"formats": totals, "matrices": format_names(formats)}


def bits_per_parameter(config: Mapping[str, Any]) -> float:
    """Stored bits per parameter of an artifact's matrices (its tapml-config.json as read):
    every linear layer and the embedding, scales included; norms (under 0.1% of the
    parameters) left out."""
    totals = config["weights"]["formats"].values()
    return 8 * sum(t["bytes"] for t in totals) / sum(t["parameters"] for t in totals)
