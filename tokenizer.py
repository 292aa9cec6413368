"""Tokenizers: SentencePiece (.model), tiktoken ranks (Llama-3), and GPT-2 style
byte-level BPE (SmolLM2, Qwen2) stored as tiktoken ranks by the converter.

A checkpoint folder holds `tokenizer_meta.json` (written by the converters)
naming the kind, the file, the special tokens and the chat format; a folder
with only a `tokenizer.model` is read as SentencePiece or Llama-3 ranks by
looking at the file.
"""
import base64
import json
from pathlib import Path

# Llama-3 split pattern (from the Llama-3 release).
LLAMA3_PATTERN = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
                  r"|\s*[\r\n]+|\s+(?!\S)|\s+")
# GPT-2's byte-level pre-tokenizer pattern.
GPT2_PATTERN = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"
LLAMA3_SPECIAL = ["<|begin_of_text|>", "<|end_of_text|>", "<|reserved_special_token_0|>",
                  "<|reserved_special_token_1|>", "<|finetune_right_pad_id|>", "<|step_id|>",
                  "<|start_header_id|>", "<|end_header_id|>", "<|eom_id|>", "<|eot_id|>", "<|python_tag|>"]


class Tokenizer:
    """Common interface: encode/decode text, special ids, chat prompts."""
    bos_id: int
    eos_id: int
    stop_ids: list
    chat_format: str = "none"
    add_bos: bool = True

    def encode(self, text: str, bos: bool = None) -> list:
        raise NotImplementedError

    def decode(self, ids) -> str:
        raise NotImplementedError

    def encode_chat(self, messages: list) -> list:
        """messages: [{"role": ..., "content": ...}] -> ids ending with the assistant header."""
        f = self.chat_format
        if f == "chatml":
            if messages[0]["role"] != "system" and getattr(self, "default_system", None):
                messages = [{"role": "system", "content": self.default_system}] + messages
            text = "".join(f"<|im_start|>{m['role']}\n{m['content']}<|im_end|>\n" for m in messages)
            return self.encode(text + "<|im_start|>assistant\n", bos=False)
        if f == "llama3":
            text = "<|begin_of_text|>" + "".join(
                f"<|start_header_id|>{m['role']}<|end_header_id|>\n\n{m['content'].strip()}<|eot_id|>"
                for m in messages)
            return self.encode(text + "<|start_header_id|>assistant<|end_header_id|>\n\n", bos=False)
        if f == "inst":  # Llama-2 / Mistral: [INST] user [/INST] assistant</s>
            ids = [self.bos_id]
            system = ""
            for m in messages:
                if m["role"] == "system":
                    system = m["content"] + "\n\n"
                elif m["role"] == "user":
                    ids += self.encode(f"[INST] {system}{m['content'].strip()} [/INST]", bos=False)
                    system = ""
                else:
                    ids += self.encode(m["content"].strip(), bos=False) + [self.eos_id]
            return ids
        return self.encode("\n".join(m["content"] for m in messages))


class SentencePieceTokenizer(Tokenizer):
    def __init__(self, model_path, chat_format="inst"):
        import sentencepiece as spm
        self.sp = spm.SentencePieceProcessor(model_file=str(model_path))
        self.bos_id, self.eos_id = self.sp.bos_id(), self.sp.eos_id()
        self.stop_ids = [self.eos_id]
        self.chat_format = chat_format

    def encode(self, text, bos=None):
        ids = self.sp.encode(text)
        return [self.bos_id] + ids if (self.add_bos if bos is None else bos) else ids

    def decode(self, ids):
        return self.sp.decode(list(ids))

    @property
    def vocab_size(self):
        return self.sp.vocab_size()


class TiktokenTokenizer(Tokenizer):
    """tiktoken over a ranks file (`base64(token) rank` per line) plus special tokens."""

    def __init__(self, ranks_path, pattern, special_tokens: dict, bos_id, eos_id, stop_ids=None,
                 chat_format="none", add_bos=True, default_system=None):
        import tiktoken
        from tiktoken.load import load_tiktoken_bpe
        ranks = load_tiktoken_bpe(str(ranks_path))
        self.model = tiktoken.Encoding(name=Path(ranks_path).name, pat_str=pattern,
                                       mergeable_ranks=ranks, special_tokens=special_tokens)
        self.special_tokens = special_tokens
        self.bos_id, self.eos_id = bos_id, eos_id
        self.stop_ids = stop_ids or [eos_id]
        self.chat_format, self.add_bos, self.default_system = chat_format, add_bos, default_system

    def encode(self, text, bos=None):
        ids = self.model.encode(text, allowed_special="all")
        return [self.bos_id] + ids if (self.add_bos if bos is None else bos) else ids

    def decode(self, ids):
        return self.model.decode(list(ids))

    @property
    def vocab_size(self):
        return self.model.n_vocab


def llama3_tokenizer(ranks_path) -> TiktokenTokenizer:
    """The Llama-3 tokenizer: 128000 ranks + 256 special tokens."""
    n = sum(1 for line in open(ranks_path, "rb") if line.strip())
    names = LLAMA3_SPECIAL + [f"<|reserved_special_token_{i}|>" for i in range(2, 256 - len(LLAMA3_SPECIAL) + 2)]
    special = {name: n + i for i, name in enumerate(names)}
    return TiktokenTokenizer(ranks_path, LLAMA3_PATTERN, special, bos_id=special["<|begin_of_text|>"],
                             eos_id=special["<|end_of_text|>"],
                             stop_ids=[special["<|end_of_text|>"], special["<|eot_id|>"]],
                             chat_format="llama3")


def write_tiktoken_ranks(path, ranks: dict):
    """ranks: {bytes: rank}. The format tiktoken's load_tiktoken_bpe reads."""
    lines = [base64.b64encode(tok).decode() + f" {rank}\n"
             for tok, rank in sorted(ranks.items(), key=lambda kv: kv[1])]
    Path(path).write_text("".join(lines))


def gpt2_byte_decoder() -> dict:
    """GPT-2's printable-unicode-character -> byte map (inverse of bytes_to_unicode)."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + \
        list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return {chr(c): b for b, c in zip(bs, cs)}


def byte_level_bpe_to_ranks(tokens: list, special_ids: set) -> dict:
    """Byte-level BPE vocab (token strings in GPT-2's unicode alphabet, id order = merge
    order) -> tiktoken mergeable ranks, rank = token id. Special tokens are excluded."""
    dec = gpt2_byte_decoder()
    return {bytes(dec[ch] for ch in tok): i for i, tok in enumerate(tokens) if i not in special_ids}


def get_tokenizer(checkpoint_dir) -> Tokenizer:
    d = Path(checkpoint_dir)
    meta_path = d / "tokenizer_meta.json"
    if meta_path.is_file():
        meta = json.loads(meta_path.read_text())
        if meta["kind"] == "sentencepiece":
            return SentencePieceTokenizer(d / meta["file"], meta.get("chat_format", "inst"))
        if meta["kind"] == "llama3":
            return llama3_tokenizer(d / meta["file"])
        if meta["kind"] == "tiktoken":
            return TiktokenTokenizer(d / meta["file"], meta["pattern"], meta["special_tokens"],
                                     meta["bos_id"], meta["eos_id"], meta.get("stop_ids"),
                                     meta.get("chat_format", "none"), meta.get("add_bos", True),
                                     meta.get("default_system"))
        raise ValueError(f"unknown tokenizer kind {meta['kind']!r} in {meta_path}")
    model = d / "tokenizer.model"
    if model.is_file():
        return load_tokenizer_model(model)
    raise FileNotFoundError(f"no tokenizer in {d} (expected tokenizer_meta.json or tokenizer.model); "
                            "re-run the converter")


def load_tokenizer_model(path) -> Tokenizer:
    """A bare tokenizer.model: SentencePiece protobuf or Llama-3 tiktoken ranks (text)."""
    head = Path(path).read_bytes()[:64]
    try:
        first = head.split(b"\n")[0].decode("ascii").split()
        base64.b64decode(first[0], validate=True)
        is_ranks = len(first) == 2 and first[1].isdigit()
    except (UnicodeDecodeError, ValueError, IndexError):
        is_ranks = False
    return llama3_tokenizer(path) if is_ranks else SentencePieceTokenizer(path)
