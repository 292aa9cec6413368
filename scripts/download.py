"""Download a Hugging Face model (needs internet and, for gated models, a token) and convert it.

    python scripts/download.py --repo-id meta-llama/Meta-Llama-3-8B-Instruct [--hf-token TOKEN]

Not used by the tests or the default path (they are offline: scripts/prepare.py).
"""
import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from scripts.convert_hf_checkpoint import ConversionError, convert  # noqa: E402


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--repo-id", required=True)
    ap.add_argument("--hf-token", default=None)
    ap.add_argument("--out-root", default="checkpoints")
    ap.add_argument("--dtype", default="bfloat16", choices=["float32", "bfloat16", "float16", "keep"])
    a = ap.parse_args()
    from huggingface_hub import snapshot_download
    raw = Path(a.out_root) / "hf" / a.repo_id.replace("/", "--")
    try:
        snapshot_download(a.repo_id, local_dir=raw, token=a.hf_token,
                          allow_patterns=["*.json", "*.safetensors", "*.model", "original/tokenizer.model"])
    except Exception as e:  # network, auth, missing repo: one line, not a traceback
        sys.exit(f"error: download of {a.repo_id} failed ({type(e).__name__}: {e}); "
                 "check the name, your network and --hf-token")
    try:
        out = convert(raw, Path(a.out_root) / a.repo_id.split("/")[-1], a.dtype)
    except (ConversionError, ValueError, KeyError) as e:
        sys.exit(f"error: {e}")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
