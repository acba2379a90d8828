"""`tapml chat` on the tiny model (context 64), and SmolLM2 answering a question."""

import pytest
from click.testing import CliRunner

from tapml.cli import main
from tapml.runtime.engine import Engine


def chat(*args, input=None):
    return CliRunner().invoke(main, ["chat", *[str(a) for a in args]], input=input)


def replies(engine, messages, max_tokens):
    """What the chat command should answer to each user message, greedily."""
    history, out = [], []
    for message in messages:
        history.append({"role": "user", "content": message})
        ids = engine.tokenizer.encode(engine.tokenizer.apply_chat_template(history))
        out.append("".join(engine.generate_text(ids, max_tokens=max_tokens)))
        history.append({"role": "assistant", "content": out[-1]})
    return out


def test_two_turns_then_end_of_input(tiny_artifact):
    artifact = tiny_artifact("q4f32_1")
    result = chat(artifact, "-n", 4, input="Hi\nHow are you?\n")
    assert result.exit_code == 0, result.output
    first, second = replies(Engine(artifact), ["Hi", "How are you?"], 4)
    assert result.stdout == f"{first}\n{second}\n"
    assert result.stderr.count("> ") == 3  # the third prompt meets the end of input
    assert "dropped" not in result.stderr


def test_the_oldest_turns_are_dropped_to_fit_the_context(tiny_artifact):
    result = chat(tiny_artifact("q4f32_1"), "-n", 16, input="Hi\nHow are you?\nAnd now?\n")
    assert result.exit_code == 0, result.output
    assert "dropped the oldest 1 turn of the conversation to fit the context of 64" in (
        result.stderr
    )
    assert result.stdout.count("\n") >= 3


def test_a_message_too_long_for_the_context_is_refused_and_the_chat_goes_on(tiny_artifact):
    result = chat(tiny_artifact("q4f32_1"), "-n", 4, input="word " * 60 + "\nHi\n")
    assert result.exit_code == 0, result.output
    assert "shorten it" in result.stderr
    assert result.stderr.count("> ") == 3 and result.stdout.endswith("\n")


def test_system_message_and_sampling_options(tiny_artifact):
    args = [tiny_artifact("q4f32_1"), "--system", "Be brief.", "-n", 4, "-t", 1.0, "--seed", 3]
    first, again = chat(*args, input="Hi\n"), chat(*args, input="Hi\n")
    assert first.exit_code == 0, first.output
    assert first.stdout == again.stdout


@pytest.mark.parametrize("where", ["prompt", "reply"])
def test_ctrl_c_ends_the_session_cleanly(tiny_artifact, monkeypatch, where):
    def interrupt(*args, **kwargs):
        raise KeyboardInterrupt

    if where == "prompt":
        monkeypatch.setattr("builtins.input", interrupt)
    else:
        monkeypatch.setattr(Engine, "generate_text", interrupt)
    result = chat(tiny_artifact("q4f32_1"), "-n", 4, input="Hi\n")
    assert result.exit_code == 0, result.output
    assert "Traceback" not in result.output and "Aborted" not in result.output


@pytest.mark.real_model
def test_smollm2_knows_the_capital_of_france(real_artifact):
    artifact = real_artifact("gguf")
    result = chat(artifact, "-n", 32, input="What is the capital of France?\n")
    assert result.exit_code == 0, result.output
    assert "Paris" in result.stdout
    engine = Engine(artifact)
    reply = "".join(engine.generate("What is the capital of France?", chat=True, max_tokens=32))
    assert "Paris" in reply and reply + "\n" == result.stdout


@pytest.mark.real_model
def test_smollm2_sampling_is_reproducible_and_stops_at_a_stop_string(real_artifact):
    from tapml.runtime.sampling import SamplingParams

    engine = Engine(real_artifact("gguf"))
    params = SamplingParams(temperature=0.8, top_p=0.95, min_p=0.05, seed=11, max_tokens=24)
    prompt = "Write one sentence about rivers."
    text = "".join(engine.generate(prompt, params, chat=True))
    assert text == "".join(engine.generate(prompt, params, chat=True))
    words = text.split()
    assert len(words) > 3
    stop = words[2]
    params.stop = (stop,)
    cut = "".join(engine.generate(prompt, params, chat=True))
    assert cut == text[: text.find(stop)] and engine.finish_reason == "stop"


@pytest.mark.real_model
def test_the_second_turn_prefills_only_its_own_tokens(real_artifact):
    engine = Engine(real_artifact("gguf"))
    tokenizer = engine.tokenizer
    history = [{"role": "user", "content": "What is the capital of France?"}]
    first_ids = tokenizer.encode(tokenizer.apply_chat_template(history))
    first = list(engine.generate_ids(first_ids, max_tokens=12, reuse_prefix=True))
    history += [{"role": "assistant", "content": tokenizer.decode(first, skip_special=True)},
                {"role": "user", "content": "And of Italy?"}]  # fmt: skip
    second_ids = tokenizer.encode(tokenizer.apply_chat_template(history))
    held = list(engine.fed)  # the first turn: its prompt and the reply it fed back
    second = list(engine.generate_ids(second_ids, max_tokens=12, reuse_prefix=True))
    pairs = zip([*held, -1], second_ids, strict=False)
    shared = next(i for i, (a, b) in enumerate(pairs) if a != b)
    assert shared >= len(first_ids)  # the whole first prompt at least came from the cache
    assert engine.stats.cached_tokens == shared
    assert engine.stats.prompt_tokens == len(second_ids) - shared
    fresh = list(engine.generate_ids(second_ids, max_tokens=12))  # prefills all of it
    assert engine.stats.prompt_tokens == len(second_ids) and engine.stats.cached_tokens == 0
    assert second == fresh
