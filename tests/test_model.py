"""Our Transformer vs Hugging Face transformers on tiny random models, through our converter."""
import pytest
import torch

from model import ModelArgs, load_model
from scripts.convert_hf_checkpoint import convert

TINY = dict(hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
            vocab_size=211, max_position_embeddings=128, rms_norm_eps=1e-6)
CASES = {
    "llama-gqa": ("LlamaConfig", "LlamaForCausalLM", dict(num_key_value_heads=2, rope_theta=10000.0)),
    "llama-tied-mha": ("LlamaConfig", "LlamaForCausalLM", dict(num_key_value_heads=4, tie_word_embeddings=True)),
    "llama3-rope-scaling": ("LlamaConfig", "LlamaForCausalLM", dict(
        num_key_value_heads=2, rope_theta=500000.0, rope_scaling=dict(
            rope_type="llama3", factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0,
            original_max_position_embeddings=32))),
    "mistral": ("MistralConfig", "MistralForCausalLM", dict(num_key_value_heads=2, sliding_window=None)),
    "qwen2-bias": ("Qwen2Config", "Qwen2ForCausalLM", dict(num_key_value_heads=2, tie_word_embeddings=False)),
}


def rel_err(a, b):
    return ((a - b).norm() / b.norm()).item()


@pytest.fixture(scope="module", params=list(CASES))
def pair(request, tmp_path_factory):
    import transformers
    config_cls, model_cls, extra = CASES[request.param]
    torch.manual_seed(0)
    config = getattr(transformers, config_cls)(**TINY, **extra)
    hf = getattr(transformers, model_cls)(config).eval()
    if request.param == "qwen2-bias":  # make sure the biases matter
        with torch.no_grad():
            for layer in hf.model.layers:
                for proj in (layer.self_attn.q_proj, layer.self_attn.k_proj, layer.self_attn.v_proj):
                    proj.bias.normal_(0, 0.5)
    src = tmp_path_factory.mktemp("hf") / request.param
    hf.save_pretrained(src)
    out = convert(src, tmp_path_factory.mktemp("ckpt") / request.param)
    return hf, load_model(out, dtype=torch.float32)


def test_prefill_logits_match_transformers(pair):
    hf, ours = pair
    ids = torch.randint(0, TINY["vocab_size"], (2, 23))
    with torch.no_grad():
        ref = hf(ids).logits
        assert rel_err(ours(ids), ref) < 1e-4  # cache-less causal forward
        ours.setup_caches(max_batch_size=2, max_seq_len=40)
        assert rel_err(ours(ids, torch.arange(23)), ref) < 1e-4  # prefill into the KV cache


def test_token_by_token_decode_matches_transformers(pair):
    hf, ours = pair
    ids = torch.randint(0, TINY["vocab_size"], (3, 17))
    with torch.no_grad():
        ref = hf(ids).logits
        ours.setup_caches(max_batch_size=3, max_seq_len=32)
        prefix = 5
        steps = [ours(ids[:, :prefix], torch.arange(prefix))]
        for t in range(prefix, ids.shape[1]):
            steps.append(ours(ids[:, t:t + 1], torch.tensor([t])))
        assert rel_err(torch.cat(steps, dim=1), ref) < 1e-4


def test_config_round_trip_and_presets():
    for name in ("Llama-3-8B", "Llama-2-7B", "Mistral-7B", "Llama-3.2-1B", "Llama-3.1-8B"):
        a = ModelArgs.from_preset(name)
        assert a.dim % a.n_heads == 0 and a.n_heads % a.n_kv_heads == 0
    a = ModelArgs.from_preset("Llama-3-8B")
    assert (a.n_kv_heads, a.intermediate_size, a.vocab_size) == (8, 14336, 128256)
    assert ModelArgs.from_preset("Llama-3.2-1B").tie_word_embeddings
    with pytest.raises(ValueError, match="unknown preset"):
        ModelArgs.from_preset("Llama-9-1T")
    with pytest.raises(ValueError, match="unsupported architecture"):
        ModelArgs.from_hf_config({"architectures": ["GPT2LMHeadModel"]})


def test_bf16_and_fp16_run_close_to_fp32(pair):
    _, ours = pair
    ids = torch.randint(0, TINY["vocab_size"], (1, 9))
    with torch.no_grad():
        ref = ours(ids)
        for dtype in (torch.bfloat16, torch.float16):
            low = ours.to(dtype)(ids).float()
            assert rel_err(low, ref) < 5e-2
    ours.to(torch.float32)


def test_argmax_last_equals_torch_argmax():
    """generate.argmax_last (per chunk, then over the chunks) gives torch.argmax's index - the first
    maximum - for rows shorter and longer than a chunk, not a multiple of it, with ties within
    and across chunks and -inf entries, eager and compiled."""
    import generate
    torch.manual_seed(0)
    for shape in ((1, 211), (3, 5000), (2, 1, 4096), (1, 128256)):
        x = torch.randn(shape)
        x[..., shape[-1] // 3] = x[..., -1] = 10.0  # ties: the first one wins
        x[0, ..., :50] = -float("inf")
        for fn in (generate.argmax_last, torch.compile(generate.argmax_last, fullgraph=True)):
            for c in (64, 1024):
                got = fn(x, chunk=c)
                assert torch.equal(got, torch.argmax(x, dim=-1, keepdim=True)), (shape, c)
    y = torch.zeros(2, 3000)
    y[1, 2999] = 1.0
    assert generate.argmax_last(y, 1024).view(-1).tolist() == [0, 2999]  # all equal: index 0


def test_decode_loop_reads_each_token_a_step_late():
    """generate.generate gives each token to the callback, and checks it for a stop, one step late (the next step
    queued first): the same tokens as checking at once, the step after a stop dropped, every token streamed in
    order. The same with the decode step compiled, whose guards the loop skips after its first step. While sites
    record, each token is read at once: no step past a stop."""
    import generate
    from model import random_model
    model = random_model(ModelArgs(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, head_dim=16, intermediate_size=96,
                                   vocab_size=97, max_position_embeddings=64), dtype=torch.float32, seed=3)
    prompt = torch.tensor([5, 17, 42, 8], dtype=torch.int)

    def at_once(n, stop=None, calls=None):  # the plain loop: check each token as soon as it is made
        model.setup_caches(max_batch_size=1, max_seq_len=len(prompt) + n)
        with torch.no_grad():
            tok = generate.prefill(model, prompt.view(1, -1), torch.arange(len(prompt)), 0.0, None)
            out = [tok]
            for t in range(len(prompt), len(prompt) + n - 1):
                if int(out[-1]) == stop or (calls is not None and len(out) == calls):
                    break
                out.append(generate.decode_one_token(model, out[-1], torch.tensor([t]), 0.0, None))
        return torch.cat([prompt.view(1, -1)] + out, 1)[0].tolist()

    eager = generate.decode_one_token
    torch._dynamo.reset()  # other tests compile decode_one_token too: start below the recompile limit
    try:
        for step in (eager, torch.compile(eager, backend="eager", fullgraph=True)):
            generate.decode_one_token = step
            full = at_once(12)
            assert generate.generate(model, prompt, 12)[0].tolist() == full
            stop = full[len(prompt) + 5]  # a token made by the 6th step: stops at its first appearance
            want = at_once(12, stop=stop)
            assert len(want) < len(full) and want[-1] == stop
            assert generate.generate(model, prompt, 12, stop_ids={stop})[0].tolist() == want
            seen = []

            def callback(token):  # streams every token; False after the 4th stops generation
                seen.append(int(token))
                return len(seen) < 4
            out = generate.generate(model, prompt, 12, callback=callback)[0].tolist()
            assert out == at_once(12, calls=4) and seen == out[len(prompt):]
            seen.clear()
            out = generate.generate(model, prompt, 12, callback=lambda t: seen.append(int(t)))[0].tolist()
            assert out == full and seen == full[len(prompt):]
            steps = []

            def counted(*args):
                steps.append(1)
                return step(*args)
            generate.decode_one_token = counted
            assert generate.generate(model, prompt, 12, stop_ids={stop})[0].tolist() == want
            assert len(steps) == len(want) - len(prompt)  # the prefill's token, then one step past the stop
            steps.clear()
            recording = generate.sparsity.recording
            generate.sparsity.recording = lambda m: True  # sites that record count every step: none past a stop
            try:
                assert generate.generate(model, prompt, 12, stop_ids={stop})[0].tolist() == want
            finally:
                generate.sparsity.recording = recording
            assert len(steps) == len(want) - len(prompt) - 1
    finally:
        generate.decode_one_token = eager
