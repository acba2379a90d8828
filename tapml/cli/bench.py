"""`tapml bench`: prefill and decode speed of a model, optionally against llama.cpp."""

from __future__ import annotations

import json

import click

from tapml.startup import PROBE_PROMPT, PROBE_TOKENS

from .options import compile_options, refuse_artifact_conflicts


@click.command("bench")
@click.argument("model")
@compile_options
@click.option("--threads", type=click.IntRange(1), default=None,
              help="CPU threads for the llvm target (and llama.cpp) "
                   "[default: $TVM_NUM_THREADS, else one per physical core].")  # fmt: skip
@click.option("--prompt-tokens", type=click.IntRange(1), default=256, show_default=True)
@click.option("--decode-tokens", type=click.IntRange(1), default=128, show_default=True)
@click.option("--compare", type=click.Choice(["llama.cpp"]), default=None,
              help="Also run llama.cpp on the same GGUF, prompt and threads "
                   "(pip install llama-cpp-python).")  # fmt: skip
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object.")
@click.pass_obj
def command(
    obj, model, target, quantization, max_context, chunk, target_options, kv_cache, threads,
    prompt_tokens, decode_tokens, compare, as_json,
) -> None:  # fmt: skip
    """Measure prefill tokens/s for a PROMPT_TOKENS prompt, decode tokens/s, peak RSS, and the
    weight-read bandwidth of decoding against this machine's memory bandwidth; and start-up in
    a fresh process: seconds to load (from the process's start), to the first token of a short
    prompt, and for the whole process, with its peak RSS.

    \b
    Examples:
      tapml bench smollm2-135m --target llvm --threads 2 --json
      tapml bench smollm2-135m --compare llama.cpp
    """
    from tapml import bench
    from tapml.artifact import Artifact
    from tapml.models import model_task, resolve_gguf
    from tapml.targets.llvm import use_threads

    refuse_artifact_conflicts(model)
    use_threads(threads)
    from tapml.api import artifact_for

    if model_task(model if Artifact.is_artifact(model) else resolve_gguf(model)[1]) == "embedding":
        raise click.UsageError(
            f"{model} is a sentence embedding model and tapml bench measures generation: "
            f"measure it with bench/embeddings.py or `tapml matrix --model {model} --stage bench`"
        )
    if compare:
        bench.import_llama_cpp()  # fail before compiling, not after
    gguf = bench.source_gguf(model) if compare else None
    artifact = artifact_for(
        model, target, quantization, max_context, chunk, target_options, obj["progress"],
        kv_cache,
    )
    result = bench.measure(artifact, prompt_tokens, decode_tokens, compare_gguf=gguf)
    if as_json:
        click.echo(json.dumps(result))
        return
    rows = [("tapml", result)] + ([("llama.cpp", result["llama_cpp"])] if compare else [])
    click.echo(f"{'':10} {'prefill tok/s':>14} {'decode tok/s':>13} {'weights GB/s':>13} "
               f"{'peak RSS MB':>12}")  # fmt: skip
    for name, r in rows:
        rss = "n/a" if r["peak_rss_mb"] is None else f"{r['peak_rss_mb']:.0f}"
        click.echo(f"{name:10} {r['prefill_tok_s']:14.1f} {r['decode_tok_s']:13.1f} "
                   f"{r['bandwidth_gb_s']:13.2f} {rss:>12}")  # fmt: skip
    if compare:
        click.echo(
            f"tapml / llama.cpp: prefill {result['prefill_ratio']:.2f}x, "
            f"decode {result['decode_ratio']:.2f}x (llama.cpp's RSS: what it added)"
        )
    click.echo(
        f"{prompt_tokens}-token prompt, {decode_tokens} decode tokens, {result['threads']} "
        f"threads; memory bandwidth {result['machine_bandwidth_gb_s']:.1f} GB/s; weights "
        f"{result['quantization']}, {result['bits_per_parameter']:.2f} bits per parameter"
    )
    click.echo(f"{'start-up':10} {'load s':>14} {'first token s':>13} {'process s':>13} "
               f"{'peak RSS MB':>12}")  # fmt: skip
    for name, r in rows:
        click.echo(f"{name:10} {r['load_s']:14.2f} {r['ttft_s']:13.3f} {r['process_s']:13.2f} "
                   f"{r['startup_rss_mb']:12.0f}")  # fmt: skip
    if compare:
        click.echo(f"tapml / llama.cpp: load + first token {result['load_ttft_ratio']:.2f}x, "
                   f"whole process {result['process_ratio']:.2f}x, peak RSS "
                   f"{result['startup_rss_ratio']:.2f}x (fresh processes: load, then "
                   f"{PROBE_TOKENS} tokens of \"{PROBE_PROMPT}\")")  # fmt: skip
    machine = result["machine_bandwidth_gb_s"]
    click.echo(
        f"decode reads {result['decode_bytes_per_token'] / 1e6:.1f} MB of weights and "
        f"{result['decode_kv_bytes_per_token'] / 1e6:.1f} MB of KV cache a token: "
        f"{result['bandwidth_gb_s'] / machine:.0%} of the memory bandwidth for the weights, "
        f"{result['bandwidth_with_kv_gb_s'] / machine:.0%} with the KV cache"
    )

