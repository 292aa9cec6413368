"""Fraction of weight rows a batch-B decode step reads (union of kept channels) on SmolLM2, TEAL.
Run from the repo root: python benchmarks/s13_union_lab.py 0.5 (caches the calibration in /tmp)."""
import sys, torch
sys.path.insert(0, ".")
import sparsity as sp, calibrate as cal, eval as ev
from model import load_model
from tokenizer import get_tokenizer
torch.manual_seed(0)
ck = "checkpoints/SmolLM2-135M-Instruct"
model = load_model(ck, dtype=torch.float32)
tok = get_tokenizer(ck)
target = float(sys.argv[1]) if len(sys.argv) > 1 else 0.5
batches = cal.token_batches(tok, cal.calibration_texts(), 8, 512)
import os
path = f"/tmp/teal{int(target*100)}.sparsity"
if os.path.exists(path):
    cfg = sp.load_config(path)
else:
    cfg = cal.calibrate(model, batches, "teal", target, tokens="decode"); sp.save_config(path, cfg)
sp.apply(model, cfg)
pt = ev.perplexity_texts()
texts = ["\n\n".join(pt[i * 40:(i + 1) * 40]) for i in range(8)]
T, steps = 256, 32
ids = torch.stack([torch.tensor(tok.encode(t)[:T]) for t in texts])
print(ids.shape)
for B in (1, 2, 4, 8):
    x = ids[:B]
    model.setup_caches(B, T + steps + 1)
    with torch.no_grad():
        logits = model(x, torch.arange(T), dense_prefix=T)
        nxt = logits[:, -1].argmax(-1, keepdim=True)
        sp.start_recording(model); sp.start_dumping(model)
        uni, per, indep = {}, {}, {}
        for i in range(steps):
            logits = model(nxt, torch.tensor([T + i]))
            nxt = logits[:, -1].argmax(-1, keepdim=True)
            for k, v in sp.take_dump(model).items():
                site = k.split(".")[-1]
                kept = v != 0
                uni.setdefault(site, []).append(kept.any(0).float().mean().item())
                per.setdefault(site, []).append(kept.float().mean().item())
                dens = kept.float().mean(1)  # per row
                indep.setdefault(site, []).append((1 - (1 - dens).prod()).item())
        sp.stop_recording(model)
    f = lambda d: " ".join(f"{s}:{sum(v)/len(v):.3f}" for s, v in d.items())
    print(f"B={B} union rows read  {f(uni)}")
    print(f"B={B} per-seq kept     {f(per)}")
    print(f"B={B} if independent   {f(indep)}", flush=True)
