"""A word-level tokenizer with a chat template, built from the workload's own text (no download)."""

from __future__ import annotations

from transformers import PreTrainedTokenizerFast

from dms_perf.bench.workloads import FILLER, NEEDLE, QUESTION

CHAT_TEMPLATE = (
    "{% for m in messages %}<|user|> {{ m['content'] }} <|end|>{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)


def word_tokenizer() -> PreTrainedTokenizerFast:
    from tokenizers import Tokenizer, models, pre_tokenizers

    pre = pre_tokenizers.Whitespace()
    corpus = " ".join([*FILLER, NEEDLE, QUESTION, "<|user|> <|end|><|assistant|> Answer: other words"])
    words = sorted({w for w, _ in pre.pre_tokenize_str(corpus)})
    vocab = {"[UNK]": 0, **{w: i + 1 for i, w in enumerate(words)}}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]")
    fast.chat_template = CHAT_TEMPLATE
    return fast
