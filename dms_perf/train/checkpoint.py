"""Checkpoint directories in and out of a retrofit.

``load_for_retrofit`` turns a Qwen3 or Qwen3-DMS checkpoint directory into a student (Qwen3-DMS) and its
frozen teacher; ``save_retrofitted`` writes the student as a checkpoint that ``load_model(DIR,
backend=...)`` and the rest of the suite take unchanged: model_type "qwen3", standard weight names in
safetensors, the ``dms_*`` config fields (docs/DMS.md, "Config fields"), the source's tokenizer files, and
``retrofit.json`` (settings and per-step history).
"""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import Qwen3Config

from dms_perf.model.qwen3_dms import DMS_DEFAULTS, DMS_FIELDS, Qwen3DMSForCausalLM, load_model, validate_dms_config

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "added_tokens.json",
                   "vocab.json", "merges.txt", "tokenizer.model", "chat_template.jinja", "chat_template.json")
HISTORY_FILE = "retrofit.json"


@dataclass
class RetrofitModels:
    student: Qwen3DMSForCausalLM
    teacher: torch.nn.Module
    source_is_dms: bool  # the source already had the dms_* fields (a Qwen3-DMS checkpoint)


def is_dms_config(config) -> bool:
    return all(getattr(config, name, None) is not None for name in DMS_FIELDS)


def read_config(path) -> Qwen3Config:
    """The config of checkpoint directory ``path``; ValueError in one line when it is not a Qwen3 one."""
    path = Path(path).expanduser()
    if not path.exists():
        raise ValueError(f"{path}: no such directory")
    if not path.is_dir():
        raise ValueError(f"{path}: a file, not a checkpoint directory")
    if not (path / "config.json").is_file():
        raise ValueError(f"{path}: holds no checkpoint (no config.json)")
    try:
        model_type = json.loads((path / "config.json").read_text()).get("model_type")
    except (OSError, ValueError) as exc:
        raise ValueError(f"{path / 'config.json'}: cannot read it: {exc}") from None
    if model_type != "qwen3":
        raise ValueError(f"{path}: model_type {model_type!r}; only Qwen3 checkpoints (model_type 'qwen3') can be "
                         "retrofitted here")
    return Qwen3Config.from_pretrained(path)


def retrofit_config(path, *, window: int | None = None):
    """The config a retrofit of the checkpoint at ``path`` runs with: a plain Qwen3 config gets the released
    checkpoint's ``dms_*`` values (``DMS_DEFAULTS``), a Qwen3-DMS one keeps its own; ``window`` sets
    ``dms_window_size``. Validated."""
    config = read_config(path)
    if not is_dms_config(config):
        for name, value in DMS_DEFAULTS.items():
            setattr(config, name, value)
    if window is not None:
        config.dms_window_size = window
    validate_dms_config(config)
    return config


def load_for_retrofit(path, *, window: int | None = None, dtype: torch.dtype = torch.bfloat16,
                      device="cpu") -> RetrofitModels:
    """Student and teacher from a Qwen3 (or Qwen3-DMS) checkpoint directory.

    A plain Qwen3 checkpoint gets the released checkpoint's ``dms_*`` values (``DMS_DEFAULTS``); its teacher
    is the vanilla Qwen3 model. A Qwen3-DMS checkpoint keeps its fields; its teacher is the same model with
    eviction off (its borrowed channel already carries decisions, not attention). ``window`` sets the
    student's ``dms_window_size``.
    """
    source_is_dms = is_dms_config(read_config(path))
    config = retrofit_config(path, window=window)
    student = Qwen3DMSForCausalLM.from_pretrained(path, config=config, dtype=dtype, attn_implementation="sdpa")
    student = student.to(device).eval()
    if source_is_dms:
        teacher = load_model(path, backend="triton" if torch.device(device).type == "cuda" else "math",
                             dtype=dtype, device=device)
        teacher.set_dms_eviction(False)
    else:
        teacher = load_model(path, backend=None, dtype=dtype, device=device)
    return RetrofitModels(student, teacher, source_is_dms)


def save_retrofitted(model: Qwen3DMSForCausalLM, out, *, source=None, compression_ratio: float | None = None,
                     record: dict | None = None) -> Path:
    """Write ``model`` to directory ``out`` (created); returns its path.

    ``compression_ratio`` goes to ``dms_cr`` (documentation only, docs/DMS.md); ``source``: the checkpoint
    directory whose tokenizer files are copied across (those it has); ``record``: JSON-able settings and
    history, written to ``retrofit.json``.
    """
    out = Path(out).expanduser()
    out.mkdir(parents=True, exist_ok=True)
    if compression_ratio is not None:  # 8, as the released config writes it, rather than 8.0
        ratio = float(compression_ratio)
        model.config.dms_cr = int(ratio) if ratio.is_integer() else ratio
    validate_dms_config(model.config)
    model.save_pretrained(out, safe_serialization=True)
    # Standard Qwen3 names: the architecture is Qwen3's, DMS lives in the dms_* fields only.
    config_path = out / "config.json"
    saved = json.loads(config_path.read_text())
    saved["architectures"] = ["Qwen3ForCausalLM"]
    saved.pop("auto_map", None)
    config_path.write_text(json.dumps(saved, indent=2, sort_keys=True) + "\n")
    if source is not None:
        source = Path(source).expanduser()
        for name in TOKENIZER_FILES:
            if (source / name).is_file():
                shutil.copy2(source / name, out / name)
    if record is not None:
        (out / HISTORY_FILE).write_text(json.dumps(record, indent=1) + "\n")
    return out
