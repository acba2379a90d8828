"""The GGUF tokenizer: llama.cpp-exact ids, save/load, streaming decode, chat template, errors."""

import pytest

from tapml.errors import TapmlError
from tapml.gguf import GGUFFile
from tapml.models import MODELS
from tapml.tokenizer import PRE_TOKENIZERS, TOKENIZER_FILE, StreamDecoder, Tokenizer

# ids from llama.cpp on the same GGUF, without BOS
# fmt: off
REFERENCE = {
    "The capital of France is": [504, 3575, 282, 4649, 314],
    "Grüße aus Köln! 東京 🚀": [
        27302, 7170, 34878, 85, 253, 376, 659, 7466, 34115,
        17, 17097, 247, 126, 16736, 122, 15107, 244, 218,
    ],
    "def f(x):\n    return x  *  2\n\n": [
        1604, 275, 24, 104, 727, 472, 1003, 1792, 216, 1672, 256, 34, 1116,
    ],
    "  leading and trailing  ": [216, 2899, 284, 35079, 256],
    "<|im_start|>user\nHi<|im_end|>": [1, 4093, 198, 26843, 2],
}
# fmt: on


@pytest.fixture(scope="module")
def metadata():
    return GGUFFile(MODELS["smollm2-135m"].gguf_path()).metadata


@pytest.fixture(scope="module")
def tokenizer(metadata):
    return Tokenizer.from_gguf_metadata(metadata)


@pytest.mark.parametrize("text", REFERENCE)
def test_matches_llama_cpp(tokenizer, text):
    ids = tokenizer.encode(text)
    assert ids == REFERENCE[text]
    assert tokenizer.decode(ids) == text


def test_special_ids(tokenizer):
    assert (tokenizer.bos_id, tokenizer.eos_id, tokenizer.vocab_size) == (1, 2, 49152)
    assert tokenizer.stop_ids == [0, 2]  # <|endoftext|>, <|im_end|>
    assert tokenizer.encode("Hi", add_bos=True) == [1, 26843]
    assert tokenizer.decode(REFERENCE["<|im_start|>user\nHi<|im_end|>"], skip_special=True) == (
        "user\nHi"
    )


def test_save_load_roundtrip(tokenizer, tmp_path):
    tokenizer.save(tmp_path)
    loaded = Tokenizer.load(tmp_path)
    for text, ids in REFERENCE.items():
        assert loaded.encode(text) == ids
        assert loaded.decode(ids) == text
    assert (loaded.stop_ids, loaded.add_bos) == (tokenizer.stop_ids, tokenizer.add_bos)
    assert loaded.chat_template == tokenizer.chat_template
    assert sorted(p.name for p in tmp_path.iterdir()) == [TOKENIZER_FILE, "tokenizer_config.json"]


def test_stream_decode_holds_back_split_characters(tokenizer):
    ids = REFERENCE["Grüße aus Köln! 東京 🚀"]
    stream = StreamDecoder(tokenizer)
    pieces = [stream.add(i) for i in ids] + [stream.flush()]
    assert "".join(pieces) == tokenizer.decode(ids)
    assert not any("\ufffd" in piece for piece in pieces)
    assert "" in pieces  # some tokens end inside a character


def test_chat_template(tokenizer):
    messages = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Hi"},
    ]
    prompt = tokenizer.apply_chat_template(messages)
    assert prompt == (
        "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n"
        "<|im_start|>assistant\n"
    )
    assert tokenizer.encode(prompt)[:3] == [1, 9690, 198]


def test_load_missing_file(tokenizer, tmp_path):
    tokenizer.save(tmp_path)
    (tmp_path / TOKENIZER_FILE).unlink()
    with pytest.raises(TapmlError, match=TOKENIZER_FILE):
        Tokenizer.load(tmp_path)


@pytest.mark.parametrize("pre", PRE_TOKENIZERS)
def test_every_pre_tokenizer_roundtrips(metadata, pre):
    tokenizer = Tokenizer.from_gguf_metadata({**metadata, "tokenizer.ggml.pre": pre})
    for text in REFERENCE:
        assert tokenizer.decode(tokenizer.encode(text)) == text


def test_unknown_pre_tokenizer(metadata):
    with pytest.raises(TapmlError, match="'nope'"):
        Tokenizer.from_gguf_metadata({**metadata, "tokenizer.ggml.pre": "nope"})


def test_no_chat_template(metadata):
    tokenizer = Tokenizer.from_gguf_metadata({**metadata, "tokenizer.chat_template": None})
    with pytest.raises(TapmlError, match="no chat template"):
        tokenizer.apply_chat_template([{"role": "user", "content": "Hi"}])
