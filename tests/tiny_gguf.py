"""Tiny random-weight Llama GGUFs (SmolLM2's tokenizer, 2 small layers) for fast tests: float32
weights, or (`write_tiny_stored_gguf`) matrices in every GGUF block type tapml keeps."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from tapml.gguf import GGUFFile
from tapml.models import MODELS

HIDDEN, INTER, LAYERS, HEADS, KV_HEADS = 64, 128, 2, 4, 2
HEAD_DIM = HIDDEN // HEADS

# The stored model: every block type and F16, and Q, K, V (and gate, up) parts of different types,
# which tapml keeps apart, next to parts of one type, which it stacks. K-quants need rows of
# a multiple of 256 values.
STORED_HIDDEN, STORED_INTER = 256, 512
STORED_TYPES = {
    "token_embd": "Q8_0",
    "blk.0.attn_q": "Q4_K", "blk.0.attn_k": "Q4_K", "blk.0.attn_v": "Q6_K",
    "blk.0.attn_output": "Q5_K", "blk.0.ffn_gate": "Q4_0", "blk.0.ffn_up": "Q4_0",
    "blk.0.ffn_down": "Q5_0",
    "blk.1.attn_q": "Q4_1", "blk.1.attn_k": "Q4_1", "blk.1.attn_v": "Q4_1",
    "blk.1.attn_output": "F16", "blk.1.ffn_gate": "Q4_K", "blk.1.ffn_up": "Q5_K",
    "blk.1.ffn_down": "Q6_K",
}  # fmt: skip


def write_tiny_gguf(path: Path, seed: int = 0, tied: bool = True, hidden: int = HIDDEN,
                    inter: int = INTER, types: dict[str, str] | None = None) -> Path:  # fmt: skip
    """A tiny Llama GGUF; `types` stores the named matrices (GGUF names without ".weight") in
    those block types (random blocks), the rest as float32."""
    head_dim = hidden // HEADS
    w, vocab = _writer(path, "llama")
    w.add_block_count(LAYERS)
    w.add_context_length(256)
    w.add_embedding_length(hidden)
    w.add_feed_forward_length(inter)
    w.add_head_count(HEADS)
    w.add_head_count_kv(KV_HEADS)
    w.add_rope_dimension_count(head_dim)
    w.add_rope_freq_base(10000.0)
    w.add_layer_norm_rms_eps(1e-5)
    add = _adder(w, seed, types)
    add("token_embd", vocab, hidden)
    for i in range(LAYERS):
        add(f"blk.{i}.attn_norm", hidden, norm=True)
        add(f"blk.{i}.attn_q", HEADS * head_dim, hidden)
        add(f"blk.{i}.attn_k", KV_HEADS * head_dim, hidden)
        add(f"blk.{i}.attn_v", KV_HEADS * head_dim, hidden)
        add(f"blk.{i}.attn_output", hidden, HEADS * head_dim)
        add(f"blk.{i}.ffn_norm", hidden, norm=True)
        add(f"blk.{i}.ffn_gate", inter, hidden)
        add(f"blk.{i}.ffn_up", inter, hidden)
        add(f"blk.{i}.ffn_down", hidden, inter)
    add("output_norm", hidden, norm=True)
    if not tied:
        add("output", vocab, hidden)
    return _finish(w, path)


def write_tiny_gemma3_gguf(path: Path, window: int, seed: int = 0) -> Path:
    """A tiny Gemma-3 GGUF of 6 layers (5 sliding within `window` positions, then 1 global),
    float32 weights, SmolLM2's tokenizer."""
    head_dim = 32
    w, vocab = _writer(path, "gemma3")
    w.add_block_count(6)
    w.add_context_length(256)
    w.add_embedding_length(HIDDEN)
    w.add_feed_forward_length(INTER)
    w.add_head_count(HEADS)
    w.add_head_count_kv(1)
    w.add_key_length(head_dim)
    w.add_value_length(head_dim)
    w.add_rope_freq_base(1000000.0)
    w.add_layer_norm_rms_eps(1e-6)
    w.add_sliding_window(window)
    add = _adder(w, seed)
    add("token_embd", vocab, HIDDEN)
    for i in range(6):
        for norm in ("attn_norm", "post_attention_norm", "ffn_norm", "post_ffw_norm"):
            add(f"blk.{i}.{norm}", HIDDEN, norm=True)
        add(f"blk.{i}.attn_q_norm", head_dim, norm=True)
        add(f"blk.{i}.attn_k_norm", head_dim, norm=True)
        add(f"blk.{i}.attn_q", HEADS * head_dim, HIDDEN)
        add(f"blk.{i}.attn_k", head_dim, HIDDEN)
        add(f"blk.{i}.attn_v", head_dim, HIDDEN)
        add(f"blk.{i}.attn_output", HIDDEN, HEADS * head_dim)
        add(f"blk.{i}.ffn_gate", INTER, HIDDEN)
        add(f"blk.{i}.ffn_up", INTER, HIDDEN)
        add(f"blk.{i}.ffn_down", HIDDEN, INTER)
    add("output_norm", HIDDEN, norm=True)
    return _finish(w, path)


def _writer(path: Path, arch: str):
    """A GGUF writer for `arch` with SmolLM2's tokenizer, and the vocabulary's size."""
    import gguf

    source = GGUFFile(MODELS["smollm2-135m"].gguf_path()).metadata
    w = gguf.GGUFWriter(str(path), arch=arch)
    w.add_tokenizer_model(source["tokenizer.ggml.model"])
    w.add_tokenizer_pre(source["tokenizer.ggml.pre"])
    w.add_token_list(source["tokenizer.ggml.tokens"])
    w.add_token_merges(source["tokenizer.ggml.merges"])
    w.add_token_types(source["tokenizer.ggml.token_type"])
    w.add_bos_token_id(source["tokenizer.ggml.bos_token_id"])
    w.add_eos_token_id(source["tokenizer.ggml.eos_token_id"])
    w.add_add_bos_token(False)
    w.add_chat_template(source["tokenizer.chat_template"])
    return w, len(source["tokenizer.ggml.tokens"])


def _adder(w, seed: int, types: dict[str, str] | None = None):
    """add(name, *shape, norm=False): a random tensor, in its block type if `types` names one."""
    import gguf
    from gguf_blocks import random_blocks

    rng = np.random.default_rng(seed)

    def add(name: str, *shape: int, norm: bool = False) -> None:
        kind = (types or {}).get(name)
        if kind == "F16":
            data = rng.standard_normal(shape) / np.sqrt(shape[-1])
            w.add_tensor(f"{name}.weight", data.astype(np.float16))
            return
        if kind is not None:
            raw = random_blocks(kind, shape[0], shape[1], 2 / np.sqrt(shape[-1]),
                                seed=int(rng.integers(1 << 31)))  # fmt: skip
            w.add_tensor(f"{name}.weight", raw, raw_shape=raw.shape,
                         raw_dtype=gguf.GGMLQuantizationType[kind])  # fmt: skip
            return
        if norm:
            data = 1.0 + 0.1 * rng.standard_normal(shape)
        else:
            data = rng.standard_normal(shape) / np.sqrt(shape[-1])
        w.add_tensor(f"{name}.weight", data.astype(np.float32))

    return add


def _finish(w, path: Path) -> Path:
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def write_tiny_stored_gguf(path: Path, seed: int = 0) -> Path:
    """The tiny model with its matrices in every block type (`STORED_TYPES`)."""
    return write_tiny_gguf(path, seed, hidden=STORED_HIDDEN, inter=STORED_INTER,
                           types=STORED_TYPES)  # fmt: skip
