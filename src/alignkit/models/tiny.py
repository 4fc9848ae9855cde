"""The built-in ``tiny`` preset: a small Llama-style model and the tokenizer that ships with alignkit.

tiny: 166,208 parameters (0.17M), vocab 1024, hidden 64, 2 layers, 4 heads, intermediate 176,
tied input/output embeddings, 256 positions. It is for tests and the quickstart: it trains in
seconds on a CPU and needs no download.

The tokenizer is a byte-level BPE (``tokenizers``) trained on ``alignkit.data.synthetic.corpus()``
and bundled in ``assets/tiny_tokenizer/``; ``scripts/build_tiny_tokenizer.py`` regenerates it and
a test checks that regenerating gives the identical ``tokenizer.json``. Byte-level BPE encodes any
text, so text outside the synthetic task still round-trips exactly (just in more tokens).

tiny-hd64 (``TINY_HD64_NAME``): the same tokenizer and depth with hidden 128 and 2 heads of
dimension 64 (533,120 parameters): vLLM's CPU attention serves head sizes 32, 64, 80, ... only, not
tiny's 16, so the vLLM tests and examples use this preset.

Special tokens: ``<|pad|>`` (id 0, a real pad distinct from eos), ``<|bos|>``, ``<|eos|>`` and the
chat role tokens ``<|system|>``, ``<|user|>``, ``<|assistant|>``. No token is added
automatically (no bos prepended), so ``tokenize(prompt) + tokenize(completion)`` is exactly the
concatenation. Chat template (a prompt rendered with ``add_generation_prompt=True`` is a prefix
of the full conversation, which is what prompt masking needs)::

    <|system|>\\n{content}\\n<|user|>\\n{content}\\n<|assistant|>\\n{content}<|eos|>
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

import torch
from transformers import LlamaConfig, LlamaForCausalLM, LlamaModel, PreTrainedTokenizerBase

from alignkit.errors import ModelError

TINY_NAME = "tiny"
TINY_HD64_NAME = "tiny-hd64"
TINY_TOKENIZER_DIR = Path(__file__).parent / "assets" / "tiny_tokenizer"
TINY_VOCAB_SIZE = 1024
TINY_MAX_LENGTH = 256
# Counted with tied embeddings: 1024*64 (embeddings = output layer) + 2 * (4*64*64 attention
# + 3*64*176 MLP + 2*64 norms) + 64 final norm. The test pins the real count to this number.
TINY_NUM_PARAMETERS = 166_208

PAD, BOS, EOS = "<|pad|>", "<|bos|>", "<|eos|>"
ROLE_TOKENS = ("<|system|>", "<|user|>", "<|assistant|>")
SPECIAL_TOKENS = (PAD, BOS, EOS, *ROLE_TOKENS)

# Explicit '\n' literals: a `{%- ... -%}` tag would otherwise strip the template's own newlines.
CHAT_TEMPLATE = (
    "{%- for message in messages -%}"
    "{%- if message['role'] not in ['system', 'user', 'assistant'] -%}"
    "{{ raise_exception('tiny chat template: unknown role ' + message['role']) }}"
    "{%- endif -%}"
    "{{ '<|' + message['role'] + '|>\\n' + message['content'] }}"
    "{%- if message['role'] == 'assistant' %}{{ eos_token }}{% else %}{{ '\\n' }}{% endif -%}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt %}{{ '<|assistant|>\\n' }}{% endif -%}"
)


def train_tiny_tokenizer(texts: Iterable[str]) -> PreTrainedTokenizerBase:
    """Train the tiny byte-level BPE on ``texts`` and wrap it as a transformers tokenizer.

    Deterministic: the ``tokenizers`` BPE trainer breaks ties in pair counts by token ids, which
    are assigned in a fixed order, so the same texts give the same merges in every process
    (checked across processes and with and without ``TOKENIZERS_PARALLELISM``).
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    texts = list(texts)
    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=TINY_VOCAB_SIZE,
        min_frequency=1,
        special_tokens=list(SPECIAL_TOKENS),
        # All 256 bytes up front, so text outside the corpus still encodes (no unknown token).
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    bpe.train_from_iterator(texts, trainer=trainer, length=len(texts))
    return PreTrainedTokenizerFast(
        tokenizer_object=bpe,
        bos_token=BOS,
        eos_token=EOS,
        pad_token=PAD,
        additional_special_tokens=list(ROLE_TOKENS),
        chat_template=CHAT_TEMPLATE,
        # Cleaning up spaces on decode (" ." -> ".") would break exact round trips.
        clean_up_tokenization_spaces=False,
        padding_side="right",
        model_max_length=TINY_MAX_LENGTH,
    )


def write_tiny_tokenizer(out_dir: str | Path = TINY_TOKENIZER_DIR) -> Path:
    """Train the tiny tokenizer on the synthetic corpus and save it to ``out_dir``."""
    from alignkit.data.synthetic import corpus

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    # The chat template goes inside tokenizer_config.json (not a .jinja file) so the package data
    # globs (*.json) ship it.
    train_tiny_tokenizer(corpus()).save_pretrained(out, save_jinja_files=False)
    return out


def load_tiny_tokenizer() -> PreTrainedTokenizerBase:
    """The bundled tiny tokenizer."""
    from transformers import AutoTokenizer

    if not (TINY_TOKENIZER_DIR / "tokenizer.json").is_file():
        raise ModelError(
            f"the tiny tokenizer is missing from {TINY_TOKENIZER_DIR} (a broken install?); "
            "regenerate it with `python scripts/build_tiny_tokenizer.py`"
        )
    return AutoTokenizer.from_pretrained(TINY_TOKENIZER_DIR)


def tiny_config(tokenizer: PreTrainedTokenizerBase) -> LlamaConfig:
    """The tiny Llama config, with vocab size and special-token ids taken from ``tokenizer``."""
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=64,
        intermediate_size=176,  # 8/3 * hidden, rounded up to a multiple of 16 (Llama's ratio)
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=4,
        max_position_embeddings=TINY_MAX_LENGTH,
        rms_norm_eps=1e-5,
        tie_word_embeddings=True,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    config.name_or_path = TINY_NAME
    return config


def tiny_hd64_config(tokenizer: PreTrainedTokenizerBase) -> LlamaConfig:
    """tiny with head dimension 64 (hidden 128 = 2 heads x 64, intermediate 352 = 8/3 x 128
    rounded up to a multiple of 16): a shape vLLM's CPU attention accepts."""
    config = tiny_config(tokenizer)
    config.hidden_size, config.intermediate_size = 128, 352
    config.num_attention_heads = config.num_key_value_heads = 2
    config.head_dim = 64
    config.name_or_path = TINY_HD64_NAME
    return config


#: The built-in presets: name -> config from the bundled tokenizer.
PRESETS = {TINY_NAME: tiny_config, TINY_HD64_NAME: tiny_hd64_config}


def build_tiny_model(
    tokenizer: PreTrainedTokenizerBase,
    seed: int = 0,
    dtype: torch.dtype = torch.float32,
    causal_lm: bool = True,
    preset: str = TINY_NAME,
) -> LlamaForCausalLM | LlamaModel:
    """A freshly initialised preset model (``PRESETS``); the same seed gives the same weights.

    ``causal_lm=False`` gives the backbone alone (no LM head), for reward and value models; its
    weights equal the causal LM's backbone for the same seed.
    """
    config = PRESETS[preset](tokenizer)
    # fork_rng: seeding must not change the caller's global random state.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = LlamaForCausalLM(config)
    model = model if causal_lm else model.model
    return model.to(dtype).eval()
