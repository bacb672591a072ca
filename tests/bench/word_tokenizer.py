"""A word-level tokenizer with a chat template, built from the workload's own text (no download)."""

from __future__ import annotations

from transformers import PreTrainedTokenizerFast

from dms_perf.bench.workloads import CODE_WORDS, FILLER, NEEDLE, QUESTION

CHAT_TEMPLATE = (
    "{% for m in messages %}<|user|> {{ m['content'] }} <|end|>{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)


def word_tokenizer(*, codes: bool = False) -> PreTrainedTokenizerFast:
    """``codes``: digits split one by one and the code words in the vocabulary, so that every code of
    ``needle_prompts`` (``0421-TULIP``) encodes without an unknown token; otherwise a number is one word
    and only the suite's ``7391-ORCHID`` is known."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    pre = pre_tokenizers.Whitespace()
    if codes:
        pre = pre_tokenizers.Sequence([pre, pre_tokenizers.Digits(individual_digits=True)])
    corpus = " ".join([*FILLER, NEEDLE, QUESTION, "<|user|> <|end|><|assistant|> Answer: other words"])
    if codes:
        corpus += " " + " ".join([*CODE_WORDS, "0123456789"])
    words = sorted({w for w, _ in pre.pre_tokenize_str(corpus)})
    vocab = {"[UNK]": 0, **{w: i + 1 for i, w in enumerate(words)}}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]")
    fast.chat_template = CHAT_TEMPLATE
    return fast
