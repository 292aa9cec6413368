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
