"""Generate text with a converted checkpoint (or random weights at a preset's shape).

    python generate.py --prompt "The capital of France is"          # embedded SmolLM2, prepared on first use
    python generate.py --chat --prompt "Write a haiku about GPUs"    # chat template of the instruct model
    python generate.py --interactive                                  # multi-turn chat
    python generate.py --random-init Llama-3-8B --device cuda --compile --max-new-tokens 128   # speed only

Prints the text as it is generated, then tokens/s, the achieved memory
bandwidth (bytes of weights a decode step reads x tokens/s) and peak memory.
"""
import argparse
import resource
import sys
import time
from pathlib import Path

import torch

import sparsity
from model import ModelArgs, Transformer, load_model, random_model

ROOT = Path(__file__).resolve().parent
DEFAULT_CHECKPOINT = ROOT / "checkpoints" / "SmolLM2-135M-Instruct"
DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}


class UserError(Exception):
    """Bad input: reported as one line, no traceback."""


# ----------------------------------------------------------------------------- sampling
def argmax_last(x, chunk: int = 1024):
    """torch.argmax(x, -1, keepdim=True) (the first index of the maximum) in two steps: within
    each chunk of `chunk` entries, then over the chunks. Compiled, an argmax over one row of a
    128k vocabulary is one program's loop: 20-30 us per decode step on an H100 (BENCHMARKS.md
    session 10); the chunks are a grid."""
    n = x.shape[-1]
    if n <= chunk:
        return torch.argmax(x, dim=-1, keepdim=True)
    xc = torch.nn.functional.pad(x, (0, -n % chunk), value=-float("inf")).unflatten(-1, (-1, chunk))
    i = torch.argmax(xc, dim=-1, keepdim=True)  # xc: (..., chunks, chunk)
    j = torch.argmax(xc.gather(-1, i).squeeze(-1), dim=-1, keepdim=True)  # the first chunk holding the maximum
    return j * chunk + i.squeeze(-1).gather(-1, j)


def multinomial_sample_one_no_sync(probs):
    # Exponential-race sampling: argmax(p / Exp(1)) is a draw from p, with no host sync.
    q = torch.empty_like(probs).exponential_(1)
    return argmax_last(probs / q).to(dtype=torch.int)


def logits_to_probs(logits, temperature: float = 1.0, top_k=None):
    logits = logits / max(temperature, 1e-5)
    if top_k is not None:
        v, _ = torch.topk(logits, min(top_k, logits.size(-1)))
        logits = torch.where(logits < v[..., -1:], -float("inf"), logits)
    return torch.softmax(logits, dim=-1)


def sample(logits, temperature: float = 0.0, top_k=None):
    """logits: (B, S, V) -> next token (B, 1) from the last position. temperature 0 = greedy."""
    last = logits[:, -1].float()
    if temperature <= 0:
        return argmax_last(last).to(torch.int)
    return multinomial_sample_one_no_sync(logits_to_probs(last, temperature, top_k))


# ----------------------------------------------------------------------------- decoding
def prefill(model: Transformer, x, input_pos, temperature, top_k, dense_prefix: int = 0):
    # x: (B, T) prompt, input_pos: (T,); rows before dense_prefix skip sparsity
    return sample(model(x, input_pos, dense_prefix), temperature, top_k)


def decode_one_token(model: Transformer, x, input_pos, temperature, top_k):
    # x: (B, 1), input_pos: (1,)
    return sample(model(x, input_pos), temperature, top_k)


def _start_copy(token):
    """token's copy to the host, queued now (pinned memory, an event after it), to be read once later steps are
    queued: a plain int(token) would wait for every step queued before it."""
    if not token.is_cuda:
        return token, None
    host = torch.empty(token.shape, dtype=token.dtype, pin_memory=True)
    host.copy_(token, non_blocking=True)
    done = torch.cuda.Event()
    done.record()
    return host, done


def decode_n_tokens(model, cur_token, input_pos, n, temperature, top_k, callback=None, stop_ids=None, dump=None):
    """n decode steps from cur_token (B, 1) at input_pos (1,), which advances; returns the n tokens (B, 1).
    The host stays a step ahead of the GPU. callback(token) (streaming; False stops) and the stop_ids check need
    a token on the host, so each token is copied there as its step ends and read only after the next step is
    queued: the GPU runs that step while the host prints. A stop then leaves one step too many, whose token is
    dropped. And after the first step a compiled decode_one_token runs without its guard checks, as nothing in
    this loop changes the model (skip_guard_eval_unsafe). Neither while sites record sparsity: their stats dicts
    change between steps, and they count (and dump) every step run. H100, one process (BENCHMARKS.md session 27):
    Llama-3-8B streamed 6.32 -> 5.33 ms per dense step and 4.59 -> 3.28 per TEAL 50% step, as fast as with no
    callback; SmolLM2-135M's TEAL 50% steps, which the host bounds, 0.80 -> 0.62 ms with no callback (the guards)
    and 1.58 -> 0.83 streamed."""
    tokens = []
    pending = []  # (index in tokens, its copy on the way to the host): not yet given to callback / checked for a stop

    def stops(copy):
        token, done = copy
        if done is not None:
            done.synchronize()
        return ((callback is not None and callback(token) is False)
                or (stop_ids is not None and token.shape[0] == 1 and int(token) in stop_ids))

    fast = not sparsity.recording(model)  # recording counts (and dumps) every step it runs: none past a stop there
    wants_host = callback is not None or stop_ids is not None
    for i in range(n):
        with torch.compiler.set_stance("default", skip_guard_eval_unsafe=fast and i > 0):
            next_token = decode_one_token(model, cur_token, input_pos, temperature, top_k)
        if dump is not None:
            dump(model)
        input_pos += 1
        cur_token = next_token.clone()  # a compiled step's output is overwritten by its next CUDA-graph replay
        tokens.append(cur_token)
        if wants_host:
            pending.append((len(tokens) - 1, _start_copy(tokens[-1])))
        while len(pending) > (1 if fast else 0):
            j, copy = pending.pop(0)
            if stops(copy):
                return tokens[:j + 1]  # without the step queued after the stop
    for j, copy in pending:
        if stops(copy):
            return tokens[:j + 1]
    return tokens


@torch.no_grad()
def generate(model: Transformer, prompt: torch.Tensor, max_new_tokens: int, batch_size: int = 1,
             temperature: float = 0.0, top_k=None, callback=None, stop_ids=None, dense_prefix: int = 0,
             record_decode: bool = False, dump=None):
    """prompt: (T,) ids. Returns (batch_size, T + generated) ids, prompt included.
    dense_prefix: prompt positions that skip activation sparsity (T under the `decode` token
    policy). record_decode: count measured sparsity over the decode steps (sparsity.stop_recording).
    dump: an ActivationDump, called after each decode step (with record_decode)."""
    T = prompt.shape[0]
    max_seq_len = T + max_new_tokens
    limit = model.config.max_position_embeddings
    if max_seq_len > limit:
        raise UserError(f"prompt ({T} tokens) + --max-new-tokens ({max_new_tokens}) = {max_seq_len} exceeds the "
                        f"model's maximum sequence length {limit}; shorten the prompt or lower --max-new-tokens")
    device = prompt.device
    model.setup_caches(max_batch_size=batch_size, max_seq_len=max_seq_len)
    x = prompt.view(1, -1).repeat(batch_size, 1)
    input_pos = torch.arange(0, T, device=device)
    next_token = prefill(model, x, input_pos, temperature, top_k, dense_prefix)
    if record_decode:
        sparsity.start_recording(model)
        if dump is not None:
            sparsity.start_dumping(model)
    if callback is not None:
        callback(next_token)
    input_pos = torch.tensor([T], device=device, dtype=torch.int)
    tokens = [next_token]
    if not (stop_ids is not None and batch_size == 1 and int(next_token) in stop_ids):
        tokens += decode_n_tokens(model, next_token.view(batch_size, -1), input_pos, max_new_tokens - 1,
                                  temperature, top_k, callback, stop_ids, dump)
    return torch.cat([x] + tokens, dim=1)


def decode_step_bytes(model: Transformer) -> int:
    """Bytes of parameters one decode step reads: every weight except the embedding
    table, of which it reads one row (unless tied to the output head)."""
    seen, total = set(), 0
    for name, p in model.named_parameters(remove_duplicate=False):
        if p.data_ptr() in seen:
            continue
        seen.add(p.data_ptr())
        if name == "tok_embeddings.weight" and not model.config.tie_word_embeddings:
            continue
        total += p.numel() * p.element_size()
    return total


def peak_memory_gb(device) -> float:
    if torch.device(device).type == "cuda":
        return torch.cuda.max_memory_allocated() / 1e9
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6  # KiB -> GB (Linux)


def synchronize(device):
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


# ----------------------------------------------------------------------------- CLI
def load(args):
    device, dtype = args.device, DTYPES[args.dtype]
    if args.random_init:
        config = ModelArgs.from_preset(args.random_init)
        return random_model(config, device=device, dtype=dtype), None
    ckpt = Path(args.checkpoint)
    if not ckpt.exists():
        if ckpt.resolve() == DEFAULT_CHECKPOINT.resolve():
            from scripts.prepare import prepare
            prepare(ckpt)
        else:
            raise UserError(f"checkpoint {ckpt} not found; convert one with scripts/convert_hf_checkpoint.py "
                            "or omit --checkpoint to use the embedded SmolLM2")
    from tokenizer import get_tokenizer
    return load_model(ckpt, device=device, dtype=dtype), get_tokenizer(ckpt)


class Streamer:
    """Prints text as tokens arrive (batch row 0), decoding the whole tail so that
    multi-byte characters split across tokens print correctly."""

    def __init__(self, tokenizer, enabled=True):
        self.tok, self.enabled, self.ids, self.printed = tokenizer, enabled, [], ""

    def __call__(self, token):
        if not self.enabled or int(token[0, 0]) in self.tok.stop_ids:
            return
        self.ids.append(int(token[0, 0]))
        text = self.tok.decode(self.ids)
        if not text.endswith("\ufffd"):
            print(text[len(self.printed):], end="", flush=True)
            self.printed = text


def run_generation(args, model, tokenizer, prompt_ids, stream=True):
    device = args.device
    prompt = torch.tensor(prompt_ids, device=device, dtype=torch.int)
    streamer = Streamer(tokenizer, enabled=stream and tokenizer is not None and args.batch_size == 1)
    stop_ids = set(tokenizer.stop_ids) if (tokenizer is not None and args.stop_at_eos) else None
    cfg = args.sparsity_cfg
    dense_prefix = cfg.dense_prefix(len(prompt_ids)) if cfg is not None else 0
    record = cfg is not None and not args.compile
    dump = ActivationDump(args.dump_activations, args.dump_tokens) if (record and args.dump_activations
                                                                        and stream) else None
    synchronize(device)
    t0 = time.perf_counter()
    out = generate(model, prompt, args.max_new_tokens, args.batch_size, args.temperature, args.top_k,
                   callback=streamer if streamer.enabled else None, stop_ids=stop_ids,
                   dense_prefix=dense_prefix, record_decode=record, dump=dump)
    synchronize(device)
    dt = time.perf_counter() - t0
    if record and stream:
        report_sparsity(model, cfg, sparsity.stop_recording(model))
    return out, dt, streamer


class ActivationDump:
    """--dump-activations DIR: the sparsified input of every site for the first n decode
    steps, one safetensors file per token (keys layers.{i}.{site}), written atomically."""

    def __init__(self, out_dir, n):
        self.dir, self.n, self.i = Path(out_dir), n, 0
        self.dir.mkdir(parents=True, exist_ok=True)

    def __call__(self, model):
        tensors = sparsity.take_dump(model)
        if self.i >= self.n or not tensors:
            return
        from safetensors.torch import save_file
        sparsity.write_atomic(self.dir / f"token_{self.i:04d}.safetensors", lambda tmp: save_file(tensors, tmp))
        self.i += 1


def report_sparsity(model, cfg, measured):
    """Measured sparsity per site over the generated tokens and the effective weight sparsity."""
    by_site = sparsity.mean_by_site(measured)
    sites = ", ".join(f"{s} {v:.3f}" for s, v in by_site.items())
    eff = sparsity.effective_sparsity(model, measured, cfg.header.get("method"))
    print(f"\nmeasured sparsity over generated tokens (tokens={cfg.tokens}): {sites}; "
          f"effective weight sparsity {eff:.3f}", file=sys.stderr)


def main(argv=None):
    ap = argparse.ArgumentParser(description="Generate text (gpt-fast style).")
    ap.add_argument("--checkpoint", default=str(DEFAULT_CHECKPOINT), help="converted checkpoint folder")
    ap.add_argument("--random-init", metavar="PRESET", help="random weights at a preset's shape (speed only)")
    ap.add_argument("--prompt", default="The history of the transistor begins")
    ap.add_argument("--prompt-len", type=int, default=16, help="synthetic prompt length with --random-init")
    ap.add_argument("--chat", action="store_true", help="wrap --prompt in the model's chat template")
    ap.add_argument("--interactive", action="store_true", help="multi-turn chat on stdin")
    ap.add_argument("--max-new-tokens", type=int, default=100)
    ap.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    ap.add_argument("--top-k", type=int, default=None)
    ap.add_argument("--num-samples", type=int, default=1)
    ap.add_argument("--batch-size", type=int, default=1)
    ap.add_argument("--compile", action="store_true", help="torch.compile the decode step (reduce-overhead)")
    ap.add_argument("--compile-prefill", action="store_true", help="also compile prefill (dynamic shapes)")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--dtype", default=None, choices=list(DTYPES),
                    help="default: bfloat16 on GPU, float32 on CPU")
    ap.add_argument("--no-stop", dest="stop_at_eos", action="store_false",
                    help="generate all --max-new-tokens even past an end-of-sequence token")
    ap.add_argument("--sparsity", metavar="CONFIG", help="activation-sparsity config from calibrate.py")
    ap.add_argument("--dump-activations", metavar="DIR", help="save sparsified site inputs per decode token")
    ap.add_argument("--dump-tokens", type=int, default=8, help="how many decode tokens to dump")
    ap.add_argument("--seed", type=int, default=1234)
    args = ap.parse_args(argv)
    args.dtype = args.dtype or ("bfloat16" if args.device.startswith("cuda") else "float32")
    try:
        return _main(args)
    except (UserError, ValueError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


def _main(args):
    global decode_one_token, prefill
    if args.max_new_tokens < 1:
        raise UserError("--max-new-tokens must be >= 1")
    if args.random_init and args.interactive:
        raise UserError("--interactive needs a real checkpoint, not --random-init")
    if args.dump_activations and (not args.sparsity or args.compile):
        raise UserError("--dump-activations needs --sparsity and no --compile (it records in eager mode)")
    torch.manual_seed(args.seed)
    t0 = time.perf_counter()
    model, tokenizer = load(args)
    args.sparsity_cfg = None
    if args.sparsity:
        args.sparsity_cfg = sparsity.load_config(args.sparsity)
        sparsity.apply(model, args.sparsity_cfg)
        h = args.sparsity_cfg.header
        print(f"sparsity: method={h.get('method')} attention={h.get('attention')} tokens={h['tokens']}"
              + (" (measured sparsity is not recorded under --compile)" if args.compile else ""), file=sys.stderr)
    print(f"loaded {model.config.name} ({model.config.architecture}, {args.dtype}) on {args.device} "
          f"in {time.perf_counter() - t0:.2f} s", file=sys.stderr)
    if torch.device(args.device).type == "cuda" and not args.compile:  # H100, BENCHMARKS.md session 28
        print("note: add --compile on a GPU: it replays each decode step as a CUDA graph instead of launching its "
              "kernels from Python (H100: SmolLM2-135M 987 vs 34 tok/s, Llama-3-8B 169 vs 26), after a ~17 s warm-up",
              file=sys.stderr)
    if args.compile:
        decode_one_token = torch.compile(decode_one_token, mode="reduce-overhead", fullgraph=True)
        if args.compile_prefill:
            prefill = torch.compile(prefill, fullgraph=True, dynamic=True)
    if args.interactive:
        return interactive(args, model, tokenizer)
    if tokenizer is None:
        prompt_ids = torch.randint(0, model.config.vocab_size, (args.prompt_len,)).tolist()
    elif args.chat:
        prompt_ids = tokenizer.encode_chat([{"role": "user", "content": args.prompt}])
    else:
        prompt_ids = tokenizer.encode(args.prompt)
    step_bytes = decode_step_bytes(model)
    runs = args.num_samples + (1 if args.compile else 0)  # a warm-up run when compiling
    for i in range(runs):
        warmup = args.compile and i == 0
        if not warmup and tokenizer is not None and args.batch_size == 1:
            print(tokenizer.decode(prompt_ids) if not args.chat else "", end="", flush=True)
        out, dt, streamer = run_generation(args, model, tokenizer, prompt_ids, stream=not warmup)
        if warmup:
            print(f"compilation / warm-up: {dt:.2f} s", file=sys.stderr)
            continue
        if tokenizer is not None and args.batch_size > 1:
            for row in out:
                print(tokenizer.decode(row[len(prompt_ids):].tolist()))
                print("-" * 40)
        print()
        n_new = out.shape[1] - len(prompt_ids)
        tok_s = n_new / dt
        print(f"sample {i + 1 - (1 if args.compile else 0)}: {n_new} tokens x batch {args.batch_size} in "
              f"{dt:.2f} s: {tok_s:.2f} tok/s per sequence, {tok_s * args.batch_size:.2f} tok/s total, "
              f"bandwidth {step_bytes * tok_s / 1e9:.2f} GB/s (weights read per step {step_bytes / 1e9:.3f} GB)",
              file=sys.stderr)
    print(f"peak memory: {peak_memory_gb(args.device):.2f} GB", file=sys.stderr)
    return 0


def interactive(args, model, tokenizer):
    history = []
    print("chat with the model; empty line or Ctrl-D to quit", file=sys.stderr)
    while True:
        try:
            text = input("> ").strip()
        except EOFError:
            break
        if not text:
            break
        history.append({"role": "user", "content": text})
        ids = tokenizer.encode_chat(history)
        out, dt, streamer = run_generation(args, model, tokenizer, ids)
        print()
        reply = out[0, len(ids):].tolist()
        reply = [t for t in reply if t not in tokenizer.stop_ids]
        history.append({"role": "assistant", "content": tokenizer.decode(reply)})
    return 0


if __name__ == "__main__":
    sys.exit(main())
