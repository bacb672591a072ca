"""Retrofitting: training a Qwen3 model to make DMS eviction decisions (docs/training.md).

``mask``        the DMS rule made differentiable (relaxed decisions, the additive training mask)
``forward``     ``dms_training_forward``: the model's modules with the training mask
``losses``      distillation KL, one-sided eviction penalty, the compression ramp
``retrofit``    ``retrofit(student, teacher, batches, ...)``: the loop and its per-step history
``checkpoint``  ``load_for_retrofit`` (checkpoint -> student, teacher) and ``save_retrofitted``
``text``        batches from a text file or a directory of .txt files
``cli``         ``dms-perf train``
``data``        the seeded training text (language and planted-fact retrieval documents, docs/models.md)
``tokenizer``   the byte-level BPE tokenizer trained on it
``pretrain``    the small base models' recipes and loop
``evaluate``    retrieval on held-out and suite needle prompts, perplexity
``build``       ``python -m dms_perf.train.build``: tokenizer and base models rebuilt from seeds
"""
