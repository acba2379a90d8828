"""A tiny random-weight Llama GGUF (SmolLM2's tokenizer, 2 small layers) for fast tests."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from tapml.gguf import GGUFFile
from tapml.models import MODELS

HIDDEN, INTER, LAYERS, HEADS, KV_HEADS = 64, 128, 2, 4, 2
HEAD_DIM = HIDDEN // HEADS


def write_tiny_gguf(path: Path, seed: int = 0, tied: bool = True) -> Path:
    import gguf

    source = GGUFFile(MODELS["smollm2-135m"].gguf_path()).metadata
    vocab = len(source["tokenizer.ggml.tokens"])
    w = gguf.GGUFWriter(str(path), arch="llama")
    w.add_block_count(LAYERS)
    w.add_context_length(256)
    w.add_embedding_length(HIDDEN)
    w.add_feed_forward_length(INTER)
    w.add_head_count(HEADS)
    w.add_head_count_kv(KV_HEADS)
    w.add_rope_dimension_count(HEAD_DIM)
    w.add_rope_freq_base(10000.0)
    w.add_layer_norm_rms_eps(1e-5)
    w.add_tokenizer_model(source["tokenizer.ggml.model"])
    w.add_tokenizer_pre(source["tokenizer.ggml.pre"])
    w.add_token_list(source["tokenizer.ggml.tokens"])
    w.add_token_merges(source["tokenizer.ggml.merges"])
    w.add_token_types(source["tokenizer.ggml.token_type"])
    w.add_bos_token_id(source["tokenizer.ggml.bos_token_id"])
    w.add_eos_token_id(source["tokenizer.ggml.eos_token_id"])
    w.add_add_bos_token(False)
    w.add_chat_template(source["tokenizer.chat_template"])
    rng = np.random.default_rng(seed)

    def add(name: str, *shape: int, norm: bool = False) -> None:
        if norm:
            data = 1.0 + 0.1 * rng.standard_normal(shape)
        else:
            data = rng.standard_normal(shape) / np.sqrt(shape[-1])
        w.add_tensor(name, data.astype(np.float32))

    add("token_embd.weight", vocab, HIDDEN)
    for i in range(LAYERS):
        add(f"blk.{i}.attn_norm.weight", HIDDEN, norm=True)
        add(f"blk.{i}.attn_q.weight", HEADS * HEAD_DIM, HIDDEN)
        add(f"blk.{i}.attn_k.weight", KV_HEADS * HEAD_DIM, HIDDEN)
        add(f"blk.{i}.attn_v.weight", KV_HEADS * HEAD_DIM, HIDDEN)
        add(f"blk.{i}.attn_output.weight", HIDDEN, HEADS * HEAD_DIM)
        add(f"blk.{i}.ffn_norm.weight", HIDDEN, norm=True)
        add(f"blk.{i}.ffn_gate.weight", INTER, HIDDEN)
        add(f"blk.{i}.ffn_up.weight", INTER, HIDDEN)
        add(f"blk.{i}.ffn_down.weight", HIDDEN, INTER)
    add("output_norm.weight", HIDDEN, norm=True)
    if not tied:
        add("output.weight", vocab, HIDDEN)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path
