"""Convert a Hugging Face checkpoint folder or a GGUF file into checkpoints/<name>/.

    python scripts/convert_hf_checkpoint.py --source path/to/hf_folder   [--name NAME]
    python scripts/convert_hf_checkpoint.py --source path/to/model.gguf  [--name NAME]

Writes model.pth (our parameter names, q/k/v fused), config.json (Hugging Face
format, the one source of the model's shape) and the tokenizer
(tokenizer_meta.json + its file; from a GGUF: byte-level BPE vocabularies as
tiktoken ranks, SentencePiece ones as a tokenizer.model). Everything is written into a temporary
folder next to the target and renamed at the end, so an interrupted or failed
conversion never leaves a partial checkpoint.
"""
import argparse
import json
import re
import shutil
import struct
import sys
import tempfile
from pathlib import Path

import torch
from tqdm import tqdm

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from model import ModelArgs  # noqa: E402
from tokenizer import GPT2_PATTERN, LLAMA3_PATTERN, byte_level_bpe_to_ranks, write_tiktoken_ranks  # noqa: E402

QWEN2_PATTERN = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
                 r"|\s*[\r\n]+|\s+(?!\S)|\s+")
HF_LAYER_NAMES = {  # Hugging Face -> ours, per layer
    "self_attn.o_proj.weight": "attention.wo.weight",
    "mlp.gate_proj.weight": "feed_forward.gate.weight",
    "mlp.up_proj.weight": "feed_forward.up.weight",
    "mlp.down_proj.weight": "feed_forward.down.weight",
    "input_layernorm.weight": "attention_norm.weight",
    "post_attention_layernorm.weight": "ffn_norm.weight",
}
GGUF_LAYER_NAMES = {
    "attn_output.weight": "attention.wo.weight",
    "ffn_gate.weight": "feed_forward.gate.weight",
    "ffn_up.weight": "feed_forward.up.weight",
    "ffn_down.weight": "feed_forward.down.weight",
    "attn_norm.weight": "attention_norm.weight",
    "ffn_norm.weight": "ffn_norm.weight",
}


class ConversionError(Exception):
    pass


# ----------------------------------------------------------------------------- Hugging Face
def load_hf_state_dict(hf_dir: Path) -> dict:
    """All tensors of a HF folder: model.safetensors, sharded safetensors (index json),
    or pytorch_model*.bin."""
    from safetensors.torch import load_file
    index = hf_dir / "model.safetensors.index.json"
    bin_index = hf_dir / "pytorch_model.bin.index.json"
    if index.is_file():
        files = sorted(set(json.loads(index.read_text())["weight_map"].values()))
    elif (hf_dir / "model.safetensors").is_file():
        files = ["model.safetensors"]
    elif bin_index.is_file():
        files = sorted(set(json.loads(bin_index.read_text())["weight_map"].values()))
    elif (hf_dir / "pytorch_model.bin").is_file():
        files = ["pytorch_model.bin"]
    else:
        raise ConversionError(f"no weights in {hf_dir} (expected model.safetensors[.index.json] or "
                              "pytorch_model.bin[.index.json])")
    state = {}
    for f in tqdm(files, desc="reading shards", unit="file"):
        if f.endswith(".safetensors"):
            state.update(load_file(str(hf_dir / f)))
        else:
            state.update(torch.load(hf_dir / f, map_location="cpu", weights_only=True, mmap=True))
    return state


def convert_hf_weights(hf: dict, args: ModelArgs) -> dict:
    out = {"tok_embeddings.weight": hf["model.embed_tokens.weight"], "norm.weight": hf["model.norm.weight"]}
    if not args.tie_word_embeddings:
        out["output.weight"] = hf["lm_head.weight"]
    for i in tqdm(range(args.n_layers), desc="converting layers", unit="layer"):
        p = f"model.layers.{i}."
        q, k, v = (hf[p + f"self_attn.{n}_proj.weight"] for n in "qkv")
        out[f"layers.{i}.attention.wqkv.weight"] = torch.cat([q, k, v])
        if args.attention_bias:
            out[f"layers.{i}.attention.wqkv.bias"] = torch.cat(
                [hf[p + f"self_attn.{n}_proj.bias"] for n in "qkv"])
        for theirs, ours in HF_LAYER_NAMES.items():
            out[f"layers.{i}.{ours}"] = hf[p + theirs]
    return out


def hf_tokenizer_files(hf_dir: Path, dst: Path, config: dict):
    """Copy or convert the tokenizer. Returns a message, or None when there is none."""
    for cand in (hf_dir / "original" / "tokenizer.model", hf_dir / "tokenizer.model"):
        if cand.is_file():
            shutil.copy(cand, dst / "tokenizer.model")
            from tokenizer import load_tokenizer_model
            kind = "llama3" if load_tokenizer_model(cand).__class__.__name__ == "TiktokenTokenizer" \
                else "sentencepiece"
            write_json(dst / "tokenizer_meta.json", {"kind": kind, "file": "tokenizer.model",
                                                     "chat_format": "llama3" if kind == "llama3" else "inst"})
            return f"tokenizer: {kind} ({cand.name})"
    tj = hf_dir / "tokenizer.json"
    if not tj.is_file():
        return None
    spec = json.loads(tj.read_text())
    if spec["model"]["type"] != "BPE":
        raise ConversionError(f"tokenizer.json model type {spec['model']['type']!r} is not supported "
                              "(byte-level BPE or a tokenizer.model are)")
    vocab = spec["model"]["vocab"]
    added = {t["content"]: t["id"] for t in spec.get("added_tokens", [])}
    tokens = [None] * (max(list(vocab.values()) + list(added.values())) + 1)
    for t, i in vocab.items():
        tokens[i] = t
    pattern = GPT2_PATTERN
    pre = json.dumps(spec.get("pre_tokenizer"))
    m = re.search(r'"Regex": ("(?:[^"\\]|\\.)*")', pre)
    if m:
        pattern = json.loads(m.group(1))
    elif '"individual_digits": true' in pre:
        pattern = r"\p{N}|" + GPT2_PATTERN
    tok_cfg_path = hf_dir / "tokenizer_config.json"
    tok_cfg = json.loads(tok_cfg_path.read_text()) if tok_cfg_path.is_file() else {}
    template = tok_cfg.get("chat_template") or ""
    write_byte_level_tokenizer(dst, [t for t in tokens], added, pattern, template,
                               bos=_token_id(tok_cfg.get("bos_token"), added, config.get("bos_token_id")),
                               eos=_token_id(tok_cfg.get("eos_token"), added, config.get("eos_token_id")),
                               add_bos=bool(tok_cfg.get("add_bos_token", False)))
    return "tokenizer: byte-level BPE from tokenizer.json"


def _token_id(tok, added, fallback):
    if isinstance(tok, dict):
        tok = tok.get("content")
    return added.get(tok, fallback)


def write_byte_level_tokenizer(dst: Path, tokens, special: dict, pattern, template, bos, eos, add_bos):
    special_ids = set(special.values())
    ranks = byte_level_bpe_to_ranks([t if t is not None else "" for t in tokens], special_ids | {
        i for i, t in enumerate(tokens) if t is None})
    write_tiktoken_ranks(dst / "tokenizer.tiktoken", ranks)
    chat_format, default_system = "none", None
    if "<|im_start|>" in template:
        chat_format = "chatml"
        m = re.search(r"<\|im_start\|>system\n(.*?)<\|im_end\|>", template, re.S)
        default_system = m.group(1) if m else None
    elif "<|start_header_id|>" in template:
        chat_format = "llama3"
    elif "[INST]" in template:
        chat_format = "inst"
    eos_tokens = [eos] + [special[t] for t in ("<|im_end|>", "<|eot_id|>", "<|endoftext|>")
                          if t in special and special[t] != eos]
    write_json(dst / "tokenizer_meta.json", {
        "kind": "tiktoken", "file": "tokenizer.tiktoken", "pattern": pattern, "special_tokens": special,
        "bos_id": bos if bos is not None else eos, "eos_id": eos, "stop_ids": eos_tokens,
        "add_bos": add_bos, "chat_format": chat_format, "default_system": default_system})


# ----------------------------------------------------------------------------- GGUF
GGUF_ARCHS = {"llama": "LlamaForCausalLM", "qwen2": "Qwen2ForCausalLM"}


def gguf_to_hf_config(fields: dict, tensor_names: set) -> dict:
    arch = fields["general.architecture"]
    if arch not in GGUF_ARCHS:
        raise ConversionError(f"GGUF architecture {arch!r} is not supported (supported: {', '.join(GGUF_ARCHS)})")
    a = lambda k, d=None: fields.get(f"{arch}.{k}", d)  # noqa: E731
    heads = a("attention.head_count")
    cfg = {
        "architectures": [GGUF_ARCHS[arch]],
        "model_type": arch,
        "hidden_size": a("embedding_length"),
        "num_hidden_layers": a("block_count"),
        "num_attention_heads": heads,
        "num_key_value_heads": a("attention.head_count_kv", heads),
        "intermediate_size": a("feed_forward_length"),
        "vocab_size": a("vocab_size") or len(fields["tokenizer.ggml.tokens"]),
        "rms_norm_eps": float(a("attention.layer_norm_rms_epsilon")),
        "rope_theta": float(a("rope.freq_base", 10000.0)),
        "max_position_embeddings": a("context_length"),
        "tie_word_embeddings": "output.weight" not in tensor_names,
        "bos_token_id": fields.get("tokenizer.ggml.bos_token_id"),
        "eos_token_id": fields.get("tokenizer.ggml.eos_token_id"),
        "torch_dtype": "float32",
    }
    if a("rope.dimension_count") and a("rope.dimension_count") != cfg["hidden_size"] // heads:
        cfg["head_dim"] = a("rope.dimension_count")
    return cfg


def unpermute_qk(w: torch.Tensor, n_heads: int) -> torch.Tensor:
    """llama.cpp stores Q/K rows interleaved for its RoPE; restore the rotate-half order."""
    out, dim = w.shape
    head_dim = out // n_heads
    return w.reshape(n_heads, head_dim // 2, 2, dim).transpose(1, 2).reshape(out, dim)


def _pb_varint(n: int) -> bytes:
    n &= (1 << 64) - 1  # negative int32: ten-byte two's complement, as protobuf writes it
    out = bytearray()
    while True:
        out.append((n & 0x7F) | (0x80 if n > 0x7F else 0))
        n >>= 7
        if not n:
            return bytes(out)


def _pb(field: int, value) -> bytes:
    """One protobuf field: int/bool -> varint, float -> fixed32, bytes/str -> length-delimited."""
    if isinstance(value, float):
        return _pb_varint(field << 3 | 5) + struct.pack("<f", value)
    if isinstance(value, (bytes, str)):
        data = value.encode() if isinstance(value, str) else value
        return _pb_varint(field << 3 | 2) + _pb_varint(len(data)) + data
    return _pb_varint(field << 3) + _pb_varint(int(value))


def sentencepiece_model_bytes(tokens, scores, types, unk_id=0, bos_id=1, eos_id=2, add_dummy_prefix=True) -> bytes:
    """A SentencePiece ModelProto for a GGUF 'llama' vocabulary, in protobuf wire format written
    by hand (protobuf is not a dependency). Field numbers from sentencepiece_model.proto:
    pieces = 1 (piece 1, score 2, type 3; GGUF token types use the same numbers: 1 normal,
    2 unknown, 3 control, 4 user-defined, 5 unused, 6 byte), trainer_spec = 2 (model_type 3 = BPE 2,
    vocab_size 4, byte_fallback 35, unk/bos/eos/pad ids 40-43), normalizer_spec = 3 (name 1,
    add_dummy_prefix 3, remove_extra_whitespaces 4, escape_whitespaces 5) - what Llama-2 and
    Mistral ship: BPE, identity normaliser, whitespace kept."""
    pieces = b"".join(_pb(1, _pb(1, t) + _pb(2, float(sc)) + _pb(3, int(ty)))
                      for t, sc, ty in zip(tokens, scores, types))
    trainer = (_pb(3, 2) + _pb(4, len(tokens)) + _pb(35, any(int(t) == 6 for t in types))
               + _pb(40, unk_id) + _pb(41, bos_id) + _pb(42, eos_id) + _pb(43, -1))
    normalizer = _pb(1, "identity") + _pb(3, add_dummy_prefix) + _pb(4, False) + _pb(5, True)
    return pieces + _pb(2, trainer) + _pb(3, normalizer)


def convert_gguf(path: Path, dst: Path):
    import gguf
    import numpy as np
    reader = gguf.GGUFReader(str(path))
    fields = {}
    for k, f in reader.fields.items():
        try:
            fields[k] = f.contents()
        except Exception:  # a field type gguf cannot render is not one we need
            pass
    tensors = {t.name: t for t in reader.tensors}
    config = gguf_to_hf_config(fields, set(tensors))
    args = ModelArgs.from_hf_config(config)

    def get(name):
        t = tensors[name]
        arr = gguf.quants.dequantize(t.data, t.tensor_type)
        return torch.from_numpy(np.array(arr, dtype=np.float32)).reshape(
            [int(s) for s in reversed(t.shape)] if len(t.shape) > 1 else [-1])

    permuted = fields["general.architecture"] == "llama"
    state = {"tok_embeddings.weight": get("token_embd.weight"), "norm.weight": get("output_norm.weight")}
    if not args.tie_word_embeddings:
        state["output.weight"] = get("output.weight")
    for i in tqdm(range(args.n_layers), desc="dequantizing layers", unit="layer"):
        p = f"blk.{i}."
        q, k, v = get(p + "attn_q.weight"), get(p + "attn_k.weight"), get(p + "attn_v.weight")
        if permuted:
            q, k = unpermute_qk(q, args.n_heads), unpermute_qk(k, args.n_kv_heads)
        state[f"layers.{i}.attention.wqkv.weight"] = torch.cat([q, k, v])
        if args.attention_bias:
            state[f"layers.{i}.attention.wqkv.bias"] = torch.cat(
                [get(p + f"attn_{n}.bias") for n in "qkv"])
        for theirs, ours in GGUF_LAYER_NAMES.items():
            state[f"layers.{i}.{ours}"] = get(p + theirs)
    write_json(dst / "config.json", config)
    torch.save(state, dst / "model.pth")
    if fields.get("tokenizer.ggml.model") == "llama":  # SentencePiece (Llama-1/2, Mistral)
        (dst / "tokenizer.model").write_bytes(sentencepiece_model_bytes(
            fields["tokenizer.ggml.tokens"], fields["tokenizer.ggml.scores"], fields["tokenizer.ggml.token_type"],
            unk_id=fields.get("tokenizer.ggml.unknown_token_id", 0),
            bos_id=fields.get("tokenizer.ggml.bos_token_id", 1),
            eos_id=fields.get("tokenizer.ggml.eos_token_id", 2),
            add_dummy_prefix=bool(fields.get("tokenizer.ggml.add_space_prefix", True))))
        return
    if fields.get("tokenizer.ggml.model") != "gpt2":
        print(f"warning: GGUF tokenizer {fields.get('tokenizer.ggml.model')!r} not converted "
              "(SentencePiece 'llama' and byte-level BPE 'gpt2' are); copy a tokenizer.model into the folder",
              file=sys.stderr)
        return
    tokens = fields["tokenizer.ggml.tokens"]
    types = fields["tokenizer.ggml.token_type"]
    special = {tokens[i]: i for i, t in enumerate(types) if t == 3}  # 3 = control token
    pre = fields.get("tokenizer.ggml.pre", "default")
    pattern = {"qwen2": QWEN2_PATTERN, "llama-bpe": LLAMA3_PATTERN}.get(pre, GPT2_PATTERN)
    write_byte_level_tokenizer(dst, tokens, special, pattern, fields.get("tokenizer.chat_template", ""),
                               bos=fields.get("tokenizer.ggml.bos_token_id"),
                               eos=fields.get("tokenizer.ggml.eos_token_id"),
                               add_bos=bool(fields.get("tokenizer.ggml.add_bos_token", False)))


# ----------------------------------------------------------------------------- driver
def write_json(path: Path, obj):
    path.write_text(json.dumps(obj, indent=2) + "\n")


def convert(source, out_dir, dtype="float32"):
    """Convert `source` (HF folder or .gguf) into `out_dir`, atomically."""
    source, out_dir = Path(source), Path(out_dir)
    if not source.exists():
        raise ConversionError(f"source {source} does not exist")
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.tmp-", dir=out_dir.parent))
    try:
        if source.suffix == ".gguf":
            convert_gguf(source, tmp)
        else:
            config_path = source / "config.json"
            if not config_path.is_file():
                raise ConversionError(f"no config.json in {source}; pass a Hugging Face model folder or a .gguf file")
            config = json.loads(config_path.read_text())
            args = ModelArgs.from_hf_config(config)  # rejects unsupported architectures early
            state = convert_hf_weights(load_hf_state_dict(source), args)
            if dtype != "keep":
                state = {k: v.to(getattr(torch, dtype)) for k, v in state.items()}
            torch.save(state, tmp / "model.pth")
            write_json(tmp / "config.json", config)
            msg = hf_tokenizer_files(source, tmp, config)
            print(msg or "warning: no tokenizer found in the source folder", file=sys.stderr)
        if out_dir.exists():
            shutil.rmtree(out_dir)
        tmp.rename(out_dir)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp)
    return out_dir


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--source", required=True, help="Hugging Face model folder or .gguf file")
    ap.add_argument("--name", help="folder name under --out-root (default: the source's name)")
    ap.add_argument("--out-root", default="checkpoints")
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16", "keep"],
                    help="dtype stored in model.pth (HF sources; GGUF is dequantized to float32)")
    a = ap.parse_args(argv)
    src = Path(a.source)
    name = a.name or (src.stem if src.suffix == ".gguf" else src.name)
    try:
        out = convert(src, Path(a.out_root) / name, a.dtype)
    except (ConversionError, ValueError, FileNotFoundError, KeyError) as e:
        sys.exit(f"error: {e}")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
