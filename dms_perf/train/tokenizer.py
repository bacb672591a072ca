"""The models' tokenizer: byte-level BPE trained here on the training generator's text (docs/models.md).

Digits are split one per token, as Qwen3's tokenizer does, and so are upper-case letters, so a code
("7391-ORCHID") is copied one character at a time through tokens that every code trains, whatever its
word: with merges learned from the training codes, a held-out word split into rare pieces ("AS" "TER")
that the model miscopied (docs/models.md).
``<|endoftext|>`` ends documents. There is no chat template (these are base models): the suite's needle
workload then asks its question as ``"...\\n\\n<question>\\nAnswer:"``, one of the training cues.
"""

from __future__ import annotations

from pathlib import Path

from dms_perf.train.data import EOS, tokenizer_corpus

DEFAULT_VOCAB_SIZE = 2048


def train_tokenizer(seed: int = 0, vocab_size: int = DEFAULT_VOCAB_SIZE, documents: int = 3000):
    """A ``transformers.PreTrainedTokenizerFast`` trained on ``documents`` generated documents (seeded)."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(" ?[A-Z]"), behavior="isolated"),
        pre_tokenizers.Digits(individual_digits=True),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True),
    ])
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, min_frequency=2, special_tokens=[EOS], show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tokenizer.train_from_iterator(tokenizer_corpus(seed, documents), trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=tokenizer, eos_token=EOS, pad_token=EOS, unk_token=None, model_max_length=1 << 20,
        clean_up_tokenization_spaces=False,
    )


def save_tokenizer(tokenizer, directory: str | Path) -> None:
    """tokenizer.json + tokenizer_config.json, loadable by ``transformers.AutoTokenizer.from_pretrained``."""
    tokenizer.save_pretrained(str(directory))
