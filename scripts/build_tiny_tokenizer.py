"""Regenerate the tiny preset's tokenizer in src/alignkit/models/assets/tiny_tokenizer/.

Trains a byte-level BPE on ``alignkit.data.synthetic.corpus()`` (deterministic: the same corpus
gives the identical tokenizer.json, which tests/models/test_tiny.py checks). Run it after the
synthetic corpus changes, then commit the regenerated files:

    PYTHONPATH=src python scripts/build_tiny_tokenizer.py
"""

from __future__ import annotations

import argparse
from pathlib import Path

from alignkit.models.tiny import TINY_TOKENIZER_DIR, write_tiny_tokenizer


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=TINY_TOKENIZER_DIR, help="output directory")
    out = write_tiny_tokenizer(parser.parse_args().out)
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(out)
    size_kb = sum(f.stat().st_size for f in out.iterdir()) / 1024
    print(f"wrote {out}: vocab {len(tokenizer)}, {size_kb:.0f} KB")


if __name__ == "__main__":
    main()
