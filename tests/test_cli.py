"""The command line, end to end on the tiny model (the real model: test_real_model.py)."""

import json

from click.testing import CliRunner
from conftest import TINY_CHUNK, TINY_CONTEXT

from tapml import __version__
from tapml.cli import main


def invoke(*args, env=None):
    return CliRunner().invoke(main, [str(a) for a in args], env=env)


def test_version_and_help():
    assert invoke("--version").output.strip() == f"tapml, version {__version__}"
    result = invoke("--help")
    for command in ["compile", "run", "models", "bench", "cache"]:
        assert command in result.output


def test_models_lists_the_default_model():
    result = invoke("models", "--json")
    assert result.exit_code == 0
    (card,) = [m for m in json.loads(result.stdout) if m["name"] == "smollm2-135m"]
    assert card["installed"] and card["path"].endswith(".gguf")


def test_compile_then_run_prints_only_the_completion(tiny_gguf, tmp_path):
    out = tmp_path / "model"
    result = invoke("-q", "compile", tiny_gguf, "--quantization", "q4f32_1", "--max-context",
                    TINY_CONTEXT, "--chunk", TINY_CHUNK, "-o", out)  # fmt: skip
    assert result.exit_code == 0, result.output
    assert result.stdout.strip() == str(out)
    result = invoke("run", out, "--prompt", "Hello", "--max-tokens", 5)
    assert result.exit_code == 0, result.output
    from tapml.runtime.engine import Engine

    engine = Engine(out)
    expected = "".join(engine.generate("Hello", max_tokens=5))
    assert result.stdout == expected + "\n"
    assert "tok/s" in result.stderr and "tok/s" not in result.stdout


def test_run_compiles_into_the_cache_on_first_use(tiny_gguf, tmp_path):
    env = {"TAPML_CACHE_DIR": str(tmp_path / "cache")}
    args = ["run", tiny_gguf, "--prompt", "Hi", "-n", 3, "--max-context", TINY_CONTEXT,
            "--chunk", TINY_CHUNK]  # fmt: skip
    first = invoke("-q", *args, env=env)
    assert first.exit_code == 0, first.output
    listing = invoke("cache", "list", env=env)
    assert listing.stdout.count("tiny-gguf-llvm-") == 1  # the GGUF's own weights by default
    second = invoke(*args, env=env)
    assert second.stdout == first.stdout
    assert "cached build" in second.stderr
    assert "compiling kernels" not in second.stderr
    assert "removed 1" in invoke("cache", "clear", env=env).stderr
    assert invoke("cache", "list", env=env).stdout == ""


def test_bad_input_exits_non_zero_with_a_clear_message(tiny_artifact):
    result = invoke("run", "no-such-model", "--prompt", "x")
    assert result.exit_code == 1
    assert "unknown model 'no-such-model'" in result.output
    assert "smollm2-135m" in result.output
    result = invoke("run", "smollm2-135m", "--target", "quantum", "--prompt", "x")
    assert result.exit_code == 2 and "llvm" in result.output
    result = invoke("compile", "smollm2-135m", "--quantization", "q9", "-o", "x")
    assert result.exit_code == 2 and "q4f32_1" in result.output
    long_prompt = "word " * 200
    result = invoke("run", tiny_artifact("q4f32_1"), "--prompt", long_prompt)
    assert result.exit_code == 1 and "compiled for a context of 64" in result.output
    result = invoke("run", "smollm2-135m", "--target-option", "mcpu", "--prompt", "x")
    assert result.exit_code == 2 and "KEY=VALUE" in result.output


def test_a_path_that_does_not_exist_is_named_as_such(tmp_path):
    result = invoke("run", tmp_path / "no" / "such" / "dir", "--prompt", "x")
    assert result.exit_code == 1
    assert f"{tmp_path / 'no' / 'such' / 'dir'} does not exist" in result.output
    assert "unknown model" not in result.output


def test_compile_options_that_differ_from_a_compiled_directory_are_refused(tiny_artifact):
    artifact = tiny_artifact("q4f32_1")
    result = invoke("run", artifact, "--target", "webgpu", "--chunk", TINY_CHUNK, "-p", "x")
    assert result.exit_code == 2
    assert f"{artifact} was compiled with --target llvm, not webgpu" in result.output
    assert "--chunk" not in result.output  # the same as the artifact's
    result = invoke("bench", artifact, "--quantization", "q0f32")
    assert result.exit_code == 2 and "--quantization q4f32_1, not q0f32" in result.output
    result = invoke("run", artifact, "--target", "llvm", "--max-context", TINY_CONTEXT, "-p",
                    "Hi", "-n", 2)  # fmt: skip
    assert result.exit_code == 0, result.output


def test_running_out_of_context_is_said_on_stderr(tiny_artifact):
    artifact = tiny_artifact("q4f32_1")
    result = invoke("run", artifact, "--prompt", "word " * 40, "--max-tokens", 60)
    assert result.exit_code == 0, result.output
    assert f"the context of {TINY_CONTEXT} tokens (prompt and output) is full" in result.stderr
    assert "--max-context" in result.stderr and "full" not in result.stdout
    result = invoke("run", artifact, "--prompt", "word " * 40, "--max-tokens", 3)
    assert "full" not in result.stderr


def test_bench_json(tiny_artifact):
    result = invoke("bench", tiny_artifact("q4f32_1"), "--prompt-tokens", 20,
                    "--decode-tokens", 4, "--json")  # fmt: skip
    assert result.exit_code == 0, result.output
    figures = json.loads(result.stdout)
    assert figures["prefill_tok_s"] > 0 and figures["decode_tok_s"] > 0
    assert figures["peak_rss_mb"] > 0


def test_chat_wraps_the_prompt_in_the_models_template(tiny_artifact):
    from tapml.runtime.engine import Engine

    engine = Engine(tiny_artifact("q4f32_1"))
    template = engine.tokenizer.apply_chat_template([{"role": "user", "content": "Hello"}])
    assert template.endswith("<|im_start|>assistant\n")
    chat = "".join(engine.generate("Hello", max_tokens=4, chat=True))
    assert chat == "".join(engine.generate(template, max_tokens=4))
    result = invoke("run", tiny_artifact("q4f32_1"), "--chat", "--prompt", "Hello", "-n", 4)
    assert result.exit_code == 0 and result.stdout == chat + "\n"


def test_python_api_loads_an_artifact_and_generates(tiny_artifact):
    import tapml

    engine = tapml.load(tiny_artifact("q4f32_1"))
    text = "".join(engine.generate("Hello", max_tokens=4))
    assert text == "".join(engine.generate("Hello", max_tokens=4))
    assert engine.stats.prompt_tokens == len(engine.tokenizer.encode("Hello"))
