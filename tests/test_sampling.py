"""The sampler, stop strings and stop tokens, and `tapml run`'s sampling options."""

import numpy as np
import pytest
from click.testing import CliRunner

from tapml.cli import main
from tapml.errors import GenerationError
from tapml.runtime.engine import Engine
from tapml.runtime.sampling import Sampler, SamplingParams

VOCAB = 49152


def invoke(*args):
    return CliRunner().invoke(main, [str(a) for a in args])


def random_logits(seed: int = 0, vocab: int = VOCAB) -> np.ndarray:
    return (np.random.default_rng(seed).standard_normal(vocab) * 3).astype(np.float32)


def kept(params: SamplingParams, logits: np.ndarray) -> set[int]:
    ids, probs = Sampler(params).candidates(logits)
    assert np.isclose(probs.sum(), 1.0) and np.all(probs > 0)
    return set(ids.tolist())


def nucleus_by_sorting(logits: np.ndarray, top_p: float) -> set[int]:
    probs = np.exp(logits.astype(np.float64) - logits.max())
    probs /= probs.sum()
    order = np.argsort(-probs, kind="stable")
    n = int(np.searchsorted(np.cumsum(probs[order]), top_p - 1e-9)) + 1
    return set(order[:n].tolist())


# four tokens with probabilities 0.5, 0.3, 0.15, 0.05 at temperature 1
FOUR = np.log(np.array([0.5, 0.3, 0.15, 0.05])).astype(np.float32)


def test_greedy_picks_the_most_likely_and_the_lowest_id_among_ties():
    logits = np.zeros(10, np.float32)
    logits[[3, 7]] = 2.0
    assert Sampler()(logits) == 3
    assert Sampler(SamplingParams(seed=1))(random_logits()) == int(np.argmax(random_logits()))


def test_temperature_towards_zero_is_greedy():
    logits = random_logits(1)
    greedy = int(np.argmax(logits))
    sampler = Sampler(SamplingParams(temperature=1e-4, seed=0))
    assert all(sampler(logits) == greedy for _ in range(20))


@pytest.mark.parametrize("k", [1, 5, 40])
def test_top_k_keeps_the_k_most_likely(k):
    logits = random_logits(2)
    want = set(np.argsort(-logits)[:k].tolist())
    assert kept(SamplingParams(temperature=1.0, top_k=k), logits) == want
    sampler = Sampler(SamplingParams(temperature=1.0, top_k=k, seed=0))
    assert all(sampler(logits) in want for _ in range(50))


def test_top_p_keeps_the_smallest_nucleus():
    for top_p, want in [(0.4, {0}), (0.7, {0, 1}), (0.8, {0, 1}), (0.81, {0, 1, 2}),
                        (1.0, {0, 1, 2, 3})]:  # fmt: skip
        assert kept(SamplingParams(temperature=1.0, top_p=top_p), FOUR) == want, top_p
    # nuclei of 4, 961, 2531 and 18802 tokens: among the most likely 256, 4096, or neither
    for scale, top_p in [(3.0, 0.9), (0.7, 0.5), (1.0, 0.9), (0.1, 0.5)]:
        logits = random_logits(3) * scale
        got = kept(SamplingParams(temperature=1.0, top_p=top_p), logits)
        assert got == nucleus_by_sorting(logits, top_p)
    # top-p applies to the distribution left by top-k: 0.5 / 0.8 reaches 0.6 alone
    assert kept(SamplingParams(temperature=1.0, top_p=0.6), FOUR) == {0, 1}
    assert kept(SamplingParams(temperature=1.0, top_k=2, top_p=0.6), FOUR) == {0}


def test_min_p_keeps_tokens_near_the_most_likely():
    assert kept(SamplingParams(temperature=1.0, min_p=0.29), FOUR) == {0, 1, 2}
    assert kept(SamplingParams(temperature=1.0, min_p=0.31), FOUR) == {0, 1}
    assert kept(SamplingParams(temperature=1.0, min_p=1.0), FOUR) == {0}


def test_temperature_scales_the_distribution():
    _, probs = Sampler(SamplingParams(temperature=1.0)).candidates(FOUR)
    assert np.allclose(probs, [0.5, 0.3, 0.15, 0.05])
    _, hot = Sampler(SamplingParams(temperature=2.0)).candidates(FOUR)
    assert np.allclose(hot, np.sqrt([0.5, 0.3, 0.15, 0.05]) / np.sqrt([0.5, 0.3, 0.15, 0.05]).sum())


def test_draws_follow_the_distribution():
    sampler = Sampler(SamplingParams(temperature=1.0, seed=0))
    counts = np.bincount([sampler(FOUR) for _ in range(4000)], minlength=4) / 4000
    assert np.allclose(counts, [0.5, 0.3, 0.15, 0.05], atol=0.03)


def test_the_same_seed_gives_the_same_ids_and_another_seed_others():
    flat = np.zeros(VOCAB, np.float32)

    def draws(seed):
        sampler = Sampler(SamplingParams(temperature=1.0, seed=seed))
        return [sampler(flat) for _ in range(50)]

    assert draws(7) == draws(7)
    assert draws(7) != draws(8)
    assert len(set(draws(7))) > 40  # flat: nearly every draw a different id


def test_repetition_penalty_changes_exactly_the_seen_ids():
    logits = random_logits(4, 100)
    logits[[1, 2]] = [2.0, -2.0]
    sampler = Sampler(SamplingParams(repetition_penalty=2.0))
    got = sampler.penalize(logits, generated=[3], prompt=[1, 2, 2])
    changed = set(np.flatnonzero(got != logits).tolist())
    assert changed == {1, 2, 3}
    assert got[1] == 1.0 and got[2] == -4.0  # positive divided, negative multiplied
    assert got[3] == (logits[3] / 2 if logits[3] > 0 else logits[3] * 2)
    assert sampler.penalize(logits) is logits  # nothing seen: no copy


def test_presence_and_frequency_penalties_count_generated_ids_only():
    logits = random_logits(5, 100)
    sampler = Sampler(SamplingParams(presence_penalty=0.5, frequency_penalty=0.25))
    got = sampler.penalize(logits, generated=[5, 5, 7], prompt=[9])
    assert set(np.flatnonzero(got != logits).tolist()) == {5, 7}
    assert np.isclose(got[5], logits[5] - 0.5 - 2 * 0.25)
    assert np.isclose(got[7], logits[7] - 0.5 - 0.25)


def test_penalties_apply_to_greedy_too():
    logits = np.array([1.0, 0.9, 0.0], np.float32)
    assert Sampler(SamplingParams(repetition_penalty=1.5))(logits, generated=[0]) == 1


def test_all_masked_logits_are_an_error():
    logits = np.full(8, -np.inf, np.float32)
    for params in (SamplingParams(), SamplingParams(temperature=1.0)):
        with pytest.raises(GenerationError, match="-inf"):
            Sampler(params)(logits)


@pytest.mark.parametrize(
    "bad",
    [
        {"temperature": -0.1}, {"temperature": float("nan")}, {"top_k": -1}, {"top_k": 1.5},
        {"top_p": 0.0}, {"top_p": 1.5}, {"min_p": -0.1}, {"min_p": 2}, {"repetition_penalty": 0},
        {"presence_penalty": 3}, {"frequency_penalty": -2.5}, {"seed": -1}, {"max_tokens": 0},
        {"stop": [""]}, {"stop_token_ids": [-1]},
    ],
)  # fmt: skip
def test_out_of_range_params_are_rejected(bad):
    (name,) = bad
    with pytest.raises(GenerationError, match=f"{name}="):
        SamplingParams(**bad)


def test_params_normalize_stop():
    assert SamplingParams(stop="END").stop == ("END",)
    assert SamplingParams(stop=["a", "b"], stop_token_ids=[3]).stop_token_ids == (3,)


def test_sampling_is_fast_on_a_full_vocabulary():
    import time

    logits = random_logits(6)
    sampler = Sampler(SamplingParams(temperature=0.8, top_k=40, top_p=0.95, min_p=0.05,
                                     repetition_penalty=1.1, seed=0))  # fmt: skip
    generated, prompt = list(range(200)), list(range(1000, 1500))
    start = time.perf_counter()
    for _ in range(100):
        sampler(logits, generated, prompt)
    assert (time.perf_counter() - start) / 100 < 0.01  # far below a decode step


# ---- the engine on the tiny model ----


@pytest.fixture(scope="module")
def engine(tiny_artifact):
    return Engine(tiny_artifact("q4f32_1"))


def greedy_pieces(engine, prompt: str, n: int) -> list[str]:
    ids = list(engine.generate_ids(engine.tokenizer.encode(prompt), max_tokens=n))
    return [engine.tokenizer.decode([i]) for i in ids]


def test_streamed_pieces_join_to_the_full_text(engine):
    params = SamplingParams(temperature=1.0, top_k=50, seed=3, max_tokens=12)
    ids = list(engine.generate_ids(engine.tokenizer.encode("Hello"), params))
    assert engine.finish_reason == "length" and len(ids) == 12
    pieces = list(engine.generate("Hello", params))
    assert "".join(pieces) == engine.tokenizer.decode(ids, skip_special=True)


def test_a_seed_reproduces_the_sampled_ids(engine):
    prompt = engine.tokenizer.encode("Hello")

    def sample(seed):
        params = SamplingParams(temperature=1.5, seed=seed, max_tokens=10)
        return list(engine.generate_ids(prompt, params))

    assert sample(1) == sample(1)
    assert sample(1) != sample(2)


def test_max_tokens_keyword_wins_over_params(engine):
    prompt = engine.tokenizer.encode("Hello")
    assert len(list(engine.generate_ids(prompt, SamplingParams(max_tokens=9), max_tokens=3))) == 3
    assert len(list(engine.generate_ids(prompt, SamplingParams(max_tokens=4)))) == 4


def test_a_stop_token_ends_generation_without_being_yielded(engine):
    prompt = engine.tokenizer.encode("Hello")
    ids = list(engine.generate_ids(prompt, max_tokens=8))
    k = next(i for i in range(1, len(ids)) if ids[i] not in ids[:i])
    stopped = list(engine.generate_ids(prompt, SamplingParams(stop_token_ids=[ids[k]])))
    assert stopped == ids[:k] and engine.finish_reason == "stop"


def test_a_stop_string_split_across_two_tokens(engine):
    pieces = greedy_pieces(engine, "Hello", 12)
    text = "".join(pieces)
    # the end of the second token's text and the start of the third's
    stop = pieces[1][-2:] + pieces[2][:2]
    assert len(stop) == 4
    want = text[: text.find(stop)]
    got = list(engine.generate("Hello", SamplingParams(stop=["never appears", stop])))
    assert "".join(got) == want and engine.finish_reason == "stop"
    # a stop string that never completes holds nothing back for good
    assert "".join(engine.generate("Hello", SamplingParams(stop=[text[-1] + "\x00"]),
                                   max_tokens=12)) == text  # fmt: skip
    assert engine.finish_reason == "length"


class FakeIds:
    """Stands in for an Engine in `Engine.generate_text`: yields fixed tokens, counting them."""

    def __init__(self, tokenizer, text):
        self.tokenizer, self.ids, self.given = tokenizer, tokenizer.encode(text), 0
        self.finish_reason = None

    def generate_ids(self, prompt_ids, params, constraint, max_tokens=None, reuse_prefix=False,
                     on_token=None):
        for token in self.ids:
            self.given += 1
            yield token
        self.finish_reason = "length"


def test_text_that_may_start_a_stop_string_is_held_back(engine):
    fake = FakeIds(engine.tokenizer, "Hello world, this is it")
    assert [engine.tokenizer.decode([i]) for i in fake.ids[:2]] == ["Hello", " world"]
    params = SamplingParams(stop=["o w", "it"])
    seen = [(piece, fake.given) for piece in Engine.generate_text(fake, [1], params)]
    # "Hello" arrives first: "Hell" is safe, "o" might begin "o w"; " world" completes the stop
    assert seen == [("Hell", 1)] and fake.finish_reason == "stop"
    fake = FakeIds(engine.tokenizer, "Hello there")
    seen = [(piece, fake.given) for piece in Engine.generate_text(fake, [1], params)]
    assert "".join(piece for piece, _ in seen) == "Hello there"
    assert seen[0] == ("Hell", 1) and fake.finish_reason == "length"


class OnlyThese:
    """A Constraint that allows `allowed` tokens only and is complete after `n` of them."""

    def __init__(self, allowed, n):
        self.allowed, self.n, self.accepted = list(allowed), n, []

    def mask(self, logits):
        masked = np.full_like(logits, -np.inf)
        masked[self.allowed] = logits[self.allowed]
        return masked

    def accept(self, token):
        assert token in self.allowed
        self.accepted.append(token)

    def is_complete(self):
        return len(self.accepted) >= self.n


def test_a_constraint_masks_accepts_and_completes(engine):
    prompt = engine.tokenizer.encode("Hello")
    constraint = OnlyThese([100, 200, 300], 3)
    ids = list(engine.generate_ids(prompt, SamplingParams(temperature=1.0, seed=0), constraint))
    assert ids == constraint.accepted and len(ids) == 3 and set(ids) <= {100, 200, 300}
    assert engine.finish_reason == "grammar"
    constraint = OnlyThese([100, 200, 300], 10)
    assert len(list(engine.generate_ids(prompt, constraint=constraint, max_tokens=4))) == 4
    assert engine.finish_reason == "length"


def test_the_end_of_the_context_is_a_finish_reason(engine):
    list(engine.generate_ids(list(range(100, 160)), max_tokens=50))
    assert engine.finish_reason in ("context", "stop")


# ---- tapml run ----


def test_run_with_a_seed_is_reproducible(tiny_artifact):
    args = ["run", tiny_artifact("q4f32_1"), "-p", "Hello", "-n", 8, "-t", 1.2, "--top-p", 0.9]
    first, again = invoke(*args, "--seed", 5), invoke(*args, "--seed", 5)
    assert first.exit_code == 0, first.output
    assert first.stdout == again.stdout
    unseeded = invoke(*args)
    assert unseeded.exit_code == 0, unseeded.output
    assert unseeded.stdout.endswith("\n")


def test_run_stops_at_a_stop_string(tiny_artifact, engine):
    text = "".join(greedy_pieces(engine, "Hello", 10))
    stop = text[5:9]
    result = invoke("run", tiny_artifact("q4f32_1"), "-p", "Hello", "-n", 10, "--stop", stop)
    assert result.exit_code == 0, result.output
    assert result.stdout == text[: text.find(stop)] + "\n"


def test_run_rejects_bad_sampling_options(tiny_artifact):
    artifact = tiny_artifact("q4f32_1")
    result = invoke("run", artifact, "-p", "Hi", "--top-p", 0)
    assert result.exit_code == 2 and "--top-p" in result.output
    result = invoke("run", artifact, "-p", "Hi", "--system", "Be brief.")
    assert result.exit_code == 2 and "--chat" in result.output
    result = invoke("run", artifact, "-p", "Hi", "--any-json", "--regex", "[a-z]+")
    assert result.exit_code == 2 and "--any-json, --regex" in result.output


def test_run_with_a_system_message(tiny_artifact, engine):
    result = invoke("run", tiny_artifact("q4f32_1"), "--chat", "--system", "Be brief.",
                    "-p", "Hi", "-n", 4)  # fmt: skip
    assert result.exit_code == 0, result.output
    want = "".join(engine.generate("Hi", chat=True, system="Be brief.", max_tokens=4))
    assert result.stdout == want + "\n"


def test_run_exits_1_when_a_constrained_output_is_incomplete(tiny_artifact, monkeypatch):
    import tapml.cli.run as run

    made = []

    def fake(tokenizer, **options):
        made.append(options)
        return OnlyThese(tokenizer.encode(" yes no"), 1000)

    monkeypatch.setattr(run, "constraint_from_options", fake)
    result = invoke("run", tiny_artifact("q4f32_1"), "-p", "Hi", "-n", 3, "--any-json")
    assert result.exit_code == 1
    assert "output is incomplete: --max-tokens ran out before the grammar completed" in (
        result.stderr
    )
    # the partial output is printed
    assert len(result.stdout.split()) == 3 and set(result.stdout.split()) <= {"yes", "no"}
    assert made == [{"json_schema": None, "any_json": True, "regex": None, "grammar": None,
                     "grammar_backend": None, "strict_schema": False, "max_string_length": 64,
                     "max_number_digits": 16, "max_array_items": 4,
                     "extra_properties": False}]  # fmt: skip


def test_run_with_a_real_constraint(tiny_artifact, tmp_path):
    pytest.importorskip("llguidance")
    artifact = tiny_artifact("q4f32_1")
    result = invoke("run", artifact, "-p", "Hi", "--regex", "[ab]{3}")
    assert result.exit_code == 0, result.output
    assert result.stdout in {a + b + c + "\n" for a in "ab" for b in "ab" for c in "ab"}
    grammar = tmp_path / "answer.gbnf"
    grammar.write_text('root ::= "yes" | "no"\n')
    result = invoke("run", artifact, "-p", "Hi", "--grammar", grammar)
    assert result.exit_code == 0, result.output
    assert result.stdout in ("yes\n", "no\n")
    result = invoke("run", artifact, "-p", "Hi", "--regex", "[ab]{50}", "-n", 3)
    assert result.exit_code == 1 and "output is incomplete" in result.stderr
