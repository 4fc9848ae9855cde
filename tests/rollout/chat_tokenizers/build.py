"""Rebuild the two small chat tokenizers the multi-turn tests use (no weights, under 100 KB each).

- ``smollm2/``: SmolLM2-135M-Instruct's own tokenizer cut to its first 1024 ids: the same
  special tokens (ids 0-16), byte alphabet, pre-tokenizer, decoder and chat template, the merges
  whose parts and result stay below id 1024 (the first ~750, in their order). Needs the fetched
  model: ``alignkit models fetch smollm2-135m-instruct``.
- ``qwen2/``: a Qwen2-style tokenizer: Qwen2's pre-tokenizer (its split regex, then byte level),
  NFC normaliser, ChatML special tokens, ``<tool_call>``/``</tool_call>`` as added (not special)
  tokens as in Qwen2.5, a 1024-token byte-level BPE trained here on a small corpus, and the
  Qwen2.5-Instruct chat template with ``tools=`` support (as TRL ships it for identity
  comparison, ``trl/chat_templates/qwen2_5.jinja``).

    python tests/rollout/chat_tokenizers/build.py [SMOLLM2_MODEL_DIR]
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

HERE = Path(__file__).parent
VOCAB = 1024
QWEN2_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
    r"|\s*[\r\n]+|\s+(?!\S)|\s+"
)


def build_smollm2(model_dir: Path) -> None:
    data = json.loads((model_dir / "tokenizer.json").read_text())
    vocab = {t: i for t, i in data["model"]["vocab"].items() if i < VOCAB}
    merges = []
    for merge in data["model"]["merges"]:
        left, right = merge.split(" ") if isinstance(merge, str) else merge
        if left in vocab and right in vocab and left + right in vocab:
            merges.append([left, right])
    data["model"]["vocab"], data["model"]["merges"] = vocab, merges
    data["added_tokens"] = [t for t in data["added_tokens"] if t["id"] < VOCAB]
    out = HERE / "smollm2"
    out.mkdir(exist_ok=True)
    (out / "tokenizer.json").write_text(json.dumps(data, ensure_ascii=False) + "\n")
    config = json.loads((model_dir / "tokenizer_config.json").read_text())
    config["chat_template"] = (model_dir / "chat_template.jinja").read_text()
    for key in ("is_local", "local_files_only"):
        config.pop(key, None)
    (out / "tokenizer_config.json").write_text(json.dumps(config, indent=2) + "\n")


def _corpus() -> list[str]:
    words = [
        "the",
        "a",
        "answer",
        "is",
        "what",
        "of",
        "and",
        "to",
        "in",
        "calculator",
        "tool",
        "call",
        "result",
        "number",
        "compute",
        "sum",
        "product",
        "difference",
        "question",
        "reply",
        "with",
        "only",
        "please",
        "you",
        "are",
        "helpful",
        "assistant",
        "user",
        "system",
        "function",
        "arguments",
        "expression",
        "name",
        "value",
        "error",
        "timed",
        "out",
        "cannot",
        "parse",
    ]
    lines = []
    for i in range(400):
        a, b = (i * 37) % 1000, (i * 53) % 100
        w = " ".join(words[(i + k) % len(words)] for k in range(8))
        lines.append(f"What is {a} * {b}? {w}. The answer is {a * b}.")
        lines.append(
            f'<tool_call>\n{{"name": "calculator", "arguments": {{"expression": "{a} * {b}"}}}}'
            f"\n</tool_call>\n<tool_response>\n{a * b}\n</tool_response>"
        )
    return lines


def build_qwen2() -> None:
    from tokenizers import (
        Regex,
        Tokenizer,
        decoders,
        models,
        normalizers,
        pre_tokenizers,
        processors,
        trainers,
    )

    bpe = Tokenizer(models.BPE())
    bpe.normalizer = normalizers.NFC()
    bpe.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(QWEN2_SPLIT), behavior="isolated", invert=False),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    bpe.decoder = decoders.ByteLevel()
    bpe.post_processor = processors.ByteLevel(trim_offsets=False)
    special = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB - 2,
        min_frequency=1,
        special_tokens=special,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    bpe.train_from_iterator(_corpus(), trainer=trainer)
    from tokenizers import AddedToken

    bpe.add_tokens(
        [AddedToken("<tool_call>", normalized=False), AddedToken("</tool_call>", normalized=False)]
    )
    out = HERE / "qwen2"
    out.mkdir(exist_ok=True)
    bpe.save(str(out / "tokenizer.json"))
    import trl

    template = (Path(trl.__file__).parent / "chat_templates" / "qwen2_5.jinja").read_text()
    config = {
        "backend": "tokenizers",
        "bos_token": None,
        "eos_token": "<|im_end|>",
        "pad_token": "<|endoftext|>",
        "unk_token": None,
        "model_max_length": 32768,
        "clean_up_tokenization_spaces": False,
        "tokenizer_class": "TokenizersBackend",
        "chat_template": template,
    }
    (out / "tokenizer_config.json").write_text(json.dumps(config, indent=2) + "\n")


if __name__ == "__main__":
    default = Path.home() / ".cache" / "alignkit" / "models" / "smollm2-135m-instruct"
    build_smollm2(Path(sys.argv[1]) if len(sys.argv) > 1 else default)
    build_qwen2()
