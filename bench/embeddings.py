"""Sentence embeddings per second: tapml on llvm against onnxruntime and sentence-transformers
on the same model (all-MiniLM-L6-v2) and the same token ids, each configuration in a fresh
process, side by side in one run.

    .venv/bin/python bench/embeddings.py [--threads 1 2] [--shapes 1x128 8x128] [--json]

Every row holds 128 token ids ([CLS], 126 word pieces of a real paragraph, [SEP]), so no
peer gains from shorter padding. onnxruntime runs the checkpoint exported to ONNX once here
(torch's exporter, mean pooling and normalization inside the graph), with
`intra_op_num_threads` = threads; sentence-transformers runs on torch with
`torch.set_num_threads`. Each worker embeds once to warm up, then repeats for at least
`--seconds` and reports the median call. The peers' vectors are compared with tapml's too.
Needs the bench extra: pip install -e '.[bench]'.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

MODEL = "all-minilm-l6-v2"
LENGTH = 128
PARAGRAPH = (
    "The river rises in the northern hills, where snowmelt feeds a chain of small lakes. It "
    "flows south through farmland for two hundred kilometres, passing three market towns whose "
    "mills once ground the region's wheat. Below the last town it widens into an estuary of "
    "salt marshes that shelter wading birds in winter. Engineers straightened its lower course "
    "a century ago to stop the spring floods, but the floods moved downstream instead, and the "
    "marshes shrank by a third. A restoration plan now lets the river spread across its old "
    "meanders again; the first results show fewer floods in the towns and more birds on the "
    "estuary each year, and the farmers who feared for their fields now graze sheep there."
)


def rows(batch: int) -> np.ndarray:
    """[batch, 128] ids: each row the paragraph from a different word, cut to 128 tokens."""
    from tapml.models import MODELS
    from tapml.tokenizer import Tokenizer

    tokenizer = Tokenizer.from_file(MODELS[MODEL].gguf_path().parent / "tokenizer.json")
    words = PARAGRAPH.split()
    out = []
    for i in range(batch):
        ids = tokenizer.encode(" ".join(words[i:] + words[:i]))
        out.append(ids[: LENGTH - 1] + ids[-1:])
    return np.array(out, np.int32)


# -- workers: one configuration each, in a process of its own ------------------------------
def time_calls(call, seconds: float) -> float:
    call()  # warm-up
    times, start = [], time.perf_counter()
    while time.perf_counter() - start < seconds or len(times) < 5:
        t = time.perf_counter()
        call()
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def tapml_worker(ids: np.ndarray, threads: int, seconds: float) -> tuple[float, np.ndarray]:
    from tapml.targets.llvm import use_threads

    use_threads(threads)
    from tapml.api import ensure_compiled
    from tapml.runtime.embedder import Embedder

    embedder = Embedder(ensure_compiled(MODEL, "llvm", progress=False))
    batch = [list(r) for r in ids]
    return time_calls(lambda: embedder.embed_ids(batch), seconds), embedder.embed_ids(batch)


def onnx_worker(ids: np.ndarray, threads: int, seconds: float, onnx_path: str
                ) -> tuple[float, np.ndarray]:  # fmt: skip
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads, options.inter_op_num_threads = threads, 1
    session = ort.InferenceSession(onnx_path, options, providers=["CPUExecutionProvider"])
    feed = {"input_ids": ids.astype(np.int64), "attention_mask": np.ones_like(ids, np.int64)}
    return time_calls(lambda: session.run(None, feed), seconds), session.run(None, feed)[0]


def sentence_transformers_worker(ids: np.ndarray, threads: int, seconds: float
                                 ) -> tuple[float, np.ndarray]:  # fmt: skip
    import torch
    from sentence_transformers import SentenceTransformer

    from tapml.models import MODELS

    torch.set_num_threads(threads)
    model = SentenceTransformer(str(MODELS[MODEL].gguf_path().parent), device="cpu")
    model.max_seq_length = LENGTH
    features = {"input_ids": torch.from_numpy(ids.astype(np.int64)),
                "attention_mask": torch.ones(ids.shape, dtype=torch.int64),
                "token_type_ids": torch.zeros(ids.shape, dtype=torch.int64)}  # fmt: skip

    def call():
        with torch.inference_mode():
            return model(dict(features))["sentence_embedding"].numpy()

    return time_calls(call, seconds), call()


def export_onnx(path: Path) -> None:
    """The checkpoint as one ONNX graph: BERT, mean pooling, L2 normalization."""
    import torch
    from transformers import AutoModel

    from tapml.models import MODELS

    bert = AutoModel.from_pretrained(str(MODELS[MODEL].gguf_path().parent)).eval()

    class Pooled(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.bert = bert

        def forward(self, input_ids, attention_mask):
            hidden = self.bert(input_ids=input_ids,
                               attention_mask=attention_mask).last_hidden_state  # fmt: skip
            mask = attention_mask.unsqueeze(-1).to(hidden.dtype)
            mean = (hidden * mask).sum(1) / mask.sum(1).clamp(min=1e-9)
            return torch.nn.functional.normalize(mean, dim=-1)

    example = torch.ones((1, LENGTH), dtype=torch.int64)
    with torch.no_grad():
        torch.onnx.export(Pooled(), (example, example), str(path), dynamo=False,
                          input_names=["input_ids", "attention_mask"],
                          output_names=["embedding"],
                          dynamic_axes={"input_ids": {0: "batch"}, "attention_mask": {0: "batch"}},
                          opset_version=17)  # fmt: skip


def measure(peer: str, batch: int, threads: int, seconds: float, onnx_path: str) -> dict:
    """Run one configuration in a fresh process; its embeddings/s and vectors."""
    with tempfile.NamedTemporaryFile(suffix=".npy") as vectors:
        command = [sys.executable, __file__, "--worker", peer, "--batch", str(batch),
                   "--threads", str(threads), "--seconds", str(seconds), "--onnx", onnx_path,
                   "--vectors", vectors.name]  # fmt: skip
        env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
        done = subprocess.run(command, capture_output=True, text=True, env=env)
        if done.returncode:
            raise SystemExit(f"{peer} {batch}x{LENGTH} threads={threads} failed:\n{done.stderr}")
        seconds_per_call = json.loads(done.stdout.strip().splitlines()[-1])["seconds"]
        return {"embeddings_per_s": batch / seconds_per_call, "vectors": np.load(vectors.name)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--shapes", nargs="+", default=["1x128", "8x128"])
    parser.add_argument("--seconds", type=float, default=3.0)
    parser.add_argument("--json", action="store_true")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    parser.add_argument("--batch", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--onnx", help=argparse.SUPPRESS)
    parser.add_argument("--vectors", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        ids, (threads,) = rows(args.batch), args.threads
        workers = {"tapml": tapml_worker, "sentence-transformers": sentence_transformers_worker,
                   "onnxruntime": lambda *a: onnx_worker(*a, args.onnx)}  # fmt: skip
        seconds, vectors = workers[args.worker](ids, threads, args.seconds)
        np.save(args.vectors, vectors)
        print(json.dumps({"seconds": seconds}))
        return
    peers = ["tapml", "onnxruntime", "sentence-transformers"]
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        onnx_path = str(Path(tmp) / "minilm.onnx")
        export_onnx(Path(onnx_path))
        for shape in args.shapes:
            batch = int(shape.split("x")[0])
            for threads in args.threads:
                got = {p: measure(p, batch, threads, args.seconds, onnx_path) for p in peers}
                mine = got["tapml"]
                row = {"shape": shape, "threads": threads}
                for p in peers:
                    row[p] = round(got[p]["embeddings_per_s"], 2)
                for p in peers[1:]:
                    row[f"tapml_vs_{p}"] = round(mine["embeddings_per_s"]
                                                 / got[p]["embeddings_per_s"], 3)  # fmt: skip
                    row[f"max_diff_{p}"] = float(np.abs(mine["vectors"] - got[p]["vectors"]).max())
                results.append(row)
                if not args.json:
                    print(f"{shape} threads={threads}: "
                          + ", ".join(f"{p} {row[p]:.1f}/s" for p in peers)
                          + f"; tapml/onnxruntime {row['tapml_vs_onnxruntime']:.2f}x, "
                          + "tapml/sentence-transformers "
                          + f"{row['tapml_vs_sentence-transformers']:.2f}x; max |diff| "
                          + f"{row['max_diff_onnxruntime']:.1e}", flush=True)
    if args.json:
        print(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
