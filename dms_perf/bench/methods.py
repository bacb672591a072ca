"""The one registry of KV-cache methods compared by ``dms-perf bench``, tests/ and benchmarks/.

A method name is ``family`` or ``family:parameter`` (``vanilla``, ``dms-triton``, ``snapkv:0.5``).
Each family is one entry of ``FAMILIES``; adding a method is adding an entry.

* ``vanilla``: transformers' Qwen3 with a dense cache.
* ``dms-hub`` / ``dms-flex`` / ``dms-triton``: the Qwen3-DMS model (docs/DMS.md) with that prefill
  attention; its cache keeps only the tokens the DMS rule keeps. ``dms-triton`` replays its decode
  steps from CUDA graphs; ``dms-triton-eager`` is the same without graphs (eager steps, as vanilla
  and every other method decode), for the like-for-like comparison with vanilla. ``dense-triton`` is
  dms-triton deciding no eviction: the same kernels and graphs over a dense cache, the tuned dense
  baseline (transformers' vanilla decode is eager).
* ``dms-calibrated:R``: dms-triton evicting with an offset calibrated on the run's own weights so that R of
  the decisions evict (``calibrate_dms``, docs/DMS.md "Random weights"): on a base checkpoint that never
  learnt DMS, untrained DMS; the parameter is the presses' (fraction removed), so the two meet at one
  kept fraction.
* kvpress presses applied to the vanilla model with ``with press(model):``; the parameter is the
  fraction of the prompt's KV pairs removed (kvpress's ``compression_ratio``).
* ``dmspress-knorm``: kvpress's ``DMSPress`` (threshold eviction outside a sliding window) over
  ``KnormPress`` scores, its threshold set on the measured prompt so that the parameter is the
  fraction evicted. kvpress's DMSPress hides evicted keys from attention but keeps them in memory.

kvpress is imported only when a press is built, so the package works where it is not installed.
"""

from __future__ import annotations

import gc
import importlib
import re
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from typing import Any

import torch

from dms_perf._runtime import HAS_CUDA

MODEL_CHOICES = ("tiny", "qwen3-8b")
KVPRESS_VERSION = "0.5.5"

# DMSPress's own default protected window; shorter prompts (the CPU smoke sizes) get a quarter of
# their length so that eviction still happens there.
DMSPRESS_WINDOW = 128


def _kvpress():
    try:
        return importlib.import_module("kvpress")
    except ImportError as exc:
        raise ImportError(
            f"kvpress is not installed, so the kvpress methods cannot run "
            f"(pip install kvpress=={KVPRESS_VERSION}): {exc}"
        ) from exc


@dataclass(frozen=True)
class Family:
    """One registry entry: how to build the method for a given parameter."""

    name: str
    summary: str
    backend: str | None = None  # model backend: None = vanilla transformers Qwen3
    # (ratio, model, input_ids) -> a kvpress press; None for methods without a press
    make_press: Callable[[float, Any, torch.Tensor], Any] | None = None
    default_ratio: float | None = None  # families taking a parameter have a default
    min_context: int = 1  # shortest prompt the method accepts
    cuda_graphs: bool = True  # DMS triton backend: replay decode steps from CUDA graphs (dms_perf.model.graph)
    evict: bool = True  # DMS model: False decides no eviction (every token kept)
    # The decode engine: Liger-Kernel's fused RMSNorm / SwiGLU / RoPE where they can run, fused q/k/v and
    # gate/up projections (dms_perf.model.fused.apply_engine_fusions), and in ``dms-perf bench`` a KV pool
    # (dms_perf.bench.generation.engine_pool); the methods of one backend share a model, so they must
    # agree on this.
    fused: bool = False
    # A press (make_press) prefilling in transformers' attention, its compressed cache then decoded on the
    # dense-triton engine (dms_perf.bench.generation.generate_once): presses on our kernels and graphs.
    press_on_engine: bool = False
    # The eviction offset is calibrated on the run's weights so that the parameter's fraction of the decisions
    # evict (Method.calibration), whatever the checkpoint's config says.
    calibrated: bool = False

    @property
    def takes_parameter(self) -> bool:
        return self.default_ratio is not None

    @property
    def needs_kvpress(self) -> bool:
        return self.make_press is not None


def _scorer(class_name: str) -> Callable[[float, Any, torch.Tensor], Any]:
    def make(ratio, model, input_ids):
        return getattr(_kvpress(), class_name)(compression_ratio=ratio)

    return make


def _dmspress_knorm(ratio: float, model, input_ids: torch.Tensor):
    kvpress = _kvpress()
    scorer = kvpress.KnormPress()
    window = min(DMSPRESS_WINDOW, input_ids.shape[-1] // 4)
    threshold = _threshold_for_ratio(model, input_ids, scorer, ratio, window)
    return kvpress.DMSPress(press=scorer, threshold=threshold, sliding_window_size=window)


def _threshold_for_ratio(model, input_ids: torch.Tensor, scorer, ratio: float, window: int) -> float:
    """Score threshold under which ``ratio`` of the prompt's (layer, head, token) slots fall.

    DMSPress evicts only tokens older than its window, so the quantile is taken over those
    candidates and scaled up to reach ``ratio`` of all tokens (capped at all candidates).
    """
    from kvpress.utils import extract_keys_and_values

    candidates: list[torch.Tensor] = []

    def record(module, args, kwargs, output):
        keys, values = extract_keys_and_values(kwargs["past_key_values"], module.layer_idx)
        scores = scorer.score(module, kwargs["hidden_states"], keys, values, None, kwargs)
        candidates.append(scores[..., : scores.shape[-1] - window].flatten())

    hooks = [layer.self_attn.register_forward_hook(record, with_kwargs=True) for layer in model.model.layers]
    try:
        with torch.inference_mode():
            model.model(input_ids=input_ids, use_cache=True)
    finally:
        for hook in hooks:
            hook.remove()
    scores = torch.cat(candidates).sort().values
    length = input_ids.shape[-1]
    fraction = min(1.0, ratio * length / max(length - window, 1))
    k = round(fraction * scores.numel())
    if k == 0:
        return float("-inf")
    if k >= scores.numel():
        return float("inf")
    # Slots strictly below the threshold are evicted; a score value is exact in the scores' dtype.
    return float(scores[k].item())


FAMILIES: dict[str, Family] = {
    f.name: f
    for f in (
        Family("vanilla", "transformers Qwen3, dense KV cache (no compression)"),
        Family("dms-hub", "Qwen3-DMS, prefill as the released code (chunked SDPA masks), torch decode", "hub"),
        Family("dms-hub-triton", "Qwen3-DMS, the released code's prefill structure with its loops replaced by "
               "dms_perf's data movers and one fused kernel launch over all keys, Triton decode (eager)",
               "hub-triton", cuda_graphs=False),
        Family("dms-flex", "Qwen3-DMS, prefill with torch flex_attention block masks, torch decode", "flex"),
        Family("dms-triton", "Qwen3-DMS, dms_perf's Triton prefill and decode kernels, decode steps replayed "
               "from CUDA graphs", "triton", fused=True),
        Family("dms-triton-eager", "dms-triton with eager decode steps (no CUDA graphs), as vanilla runs",
               "triton", cuda_graphs=False, fused=True),
        Family("dense-triton", "dms-triton with eviction off (every token kept): dense attention on the same "
               "kernels and CUDA-graph decode, the tuned dense baseline of dms-triton", "triton", evict=False,
               fused=True),
        Family("dms-calibrated", "dms-triton evicting R of its decisions by an offset calibrated on these weights "
               "(a base checkpoint: untrained DMS)", "triton", default_ratio=0.5, fused=True, calibrated=True),
        # SnapKVPress scores with its last 64 queries and asserts the prompt is longer than that.
        Family("snapkv", "kvpress SnapKVPress (attention of the last 64 queries)", None, _scorer("SnapKVPress"),
               0.5, min_context=65),
        Family("streamingllm", "kvpress StreamingLLMPress (sinks + recent)", None,
               _scorer("StreamingLLMPress"), 0.5),
        Family("knorm", "kvpress KnormPress (key norm)", None, _scorer("KnormPress"), 0.5),
        Family("expected-attention", "kvpress ExpectedAttentionPress", None,
               _scorer("ExpectedAttentionPress"), 0.5),
        Family("dmspress-knorm", "kvpress DMSPress over KnormPress, threshold set to the ratio", None,
               _dmspress_knorm, 0.5),
        # The same presses decoded on the dense-triton engine (eviction off, fused kernels, CUDA graphs).
        # DMSPress is left out: it hides keys in attention instead of removing them from the cache.
        *(
            Family(f"{press}-triton", f"kvpress {cls}'s compressed prefill cache decoded on dense-triton's "
                   "engine (Triton kernels, CUDA graphs)", "triton", _scorer(cls), 0.5, min_context=floor,
                   evict=False, fused=True, press_on_engine=True)
            for press, cls, floor in (
                ("snapkv", "SnapKVPress", 65), ("streamingllm", "StreamingLLMPress", 1),
                ("knorm", "KnormPress", 1), ("expected-attention", "ExpectedAttentionPress", 1),
            )
        ),
    )
}

# The model backends the registry uses, in registry order (vanilla's None excluded).
DMS_BACKENDS = tuple(dict.fromkeys(f.backend for f in FAMILIES.values() if f.backend is not None))

DEFAULT_METHODS = (
    "vanilla", "dms-hub", "dms-hub-triton", "dms-flex", "dms-triton", "dms-triton-eager", "dense-triton", "snapkv:0.5",
    "streamingllm:0.5", "knorm:0.5", "expected-attention:0.5", "dmspress-knorm:0.5", "snapkv-triton:0.5",
    "streamingllm-triton:0.5", "knorm-triton:0.5", "expected-attention-triton:0.5", "dms-calibrated:0.5",
)


def valid_names() -> str:
    """Human-readable list of method names, for --help and error messages."""
    parts = []
    for f in FAMILIES.values():
        parts.append(f"{f.name}:<ratio in [0, 1), default {f.default_ratio}>" if f.takes_parameter else f.name)
    return ", ".join(parts)


def describe_methods(families=None) -> str:
    """One line per family (all, or ``families``): name (with its parameter) and what it is, for --help."""
    return "\n".join(
        f"  {f.name + (':R' if f.takes_parameter else ''):22} {f.summary}"
        for f in (FAMILIES.values() if families is None else families)
    )


def family_backend(family: Family) -> str:
    """The model a family runs on: ``vanilla`` (transformers Qwen3), ``vanilla+kvpress`` or the DMS backend."""
    if family.backend is not None:
        return family.backend
    return "vanilla+kvpress" if family.needs_kvpress else "vanilla"


def format_methods_table(width: int = 110) -> str:
    """The registry as a plain-text table (``dms-perf methods``): name, parameter and its default, backend,
    summary (wrapped to ``width`` columns)."""
    import textwrap

    rows = [("name", "parameter (default)", "backend", "summary")]
    for f in FAMILIES.values():
        parameter = f"R (default {f.default_ratio:g})" if f.takes_parameter else "-"
        rows.append((f.name, parameter, family_backend(f), f.summary))
    widths = [max(len(r[i]) for r in rows) for i in range(3)]
    indent = sum(widths) + 2 * len(widths)
    lines = []
    for r in rows:
        head = "".join(f"{cell:{w}}  " for cell, w in zip(r[:3], widths, strict=True))
        wrapped = textwrap.wrap(r[3], max(40, width - indent)) or [""]
        lines.append(head + wrapped[0])
        lines += [" " * indent + more for more in wrapped[1:]]
    return "\n".join(lines)


@dataclass(frozen=True)
class Method:
    """A resolved method: family plus parameter. ``name`` is canonical (``snapkv:0.5``)."""

    family: Family
    ratio: float | None = None
    name: str = field(init=False)

    def __post_init__(self):
        name = self.family.name if self.ratio is None else f"{self.family.name}:{self.ratio:g}"
        object.__setattr__(self, "name", name)

    @property
    def backend(self) -> str | None:
        return self.family.backend

    @property
    def min_context(self) -> int:
        return self.family.min_context

    @property
    def is_dms(self) -> bool:
        return self.family.backend is not None

    @property
    def evicts(self) -> bool:
        """Whether the DMS model decides evictions (``dense-triton`` runs it with none)."""
        return self.is_dms and self.family.evict

    @property
    def target_cr(self) -> float | None:
        """The compression ratio a calibrated family's eviction is calibrated to: 1 / (1 - R); else None."""
        return 1.0 / (1.0 - self.ratio) if self.family.calibrated else None

    def calibration(self, model):
        """The calibration a calibrated family evicts with on ``model``: ``calibration_for`` the weights
        ``load_model_for`` built it from (found once per process); None for other families."""
        if not self.family.calibrated:
            return None
        source = getattr(model, "dms_source", None)
        if source is None:
            raise ValueError(f"{self.name} calibrates eviction on the weights its model was built from: build the "
                             "model with load_model_for")
        return calibration_for(source["model"], dtype=model.dtype, device=source["device"], seed=source["seed"],
                               target_cr=self.target_cr)

    def prepare(self, model) -> None:
        """Put a model of this method's backend (shared by the methods of that backend) into exactly the
        state this method runs in, whatever ran on it before: its attention backend, CUDA-graph decode,
        eviction on or off, the borrowed query channel, the offset it was loaded with (its calibration),
        the default spare decode rows, no KV pool and no captured decode graph. The engine's fusions
        cannot be undone: a model built without them (or with them, for a method without) is refused."""
        if not self.is_dms:
            return
        engine = hasattr(model, "dms_fused_projections")  # set by dms_perf.model.fused.fuse_projections
        if engine != self.family.fused:
            need = "with" if self.family.fused else "without"
            raise ValueError(f"{self.name} runs on a model {need} the decode engine's fusions; this one has "
                             f"{'them' if engine else 'none'} (load_model_for builds the right one)")
        from dms_perf.model.cache import DEFAULT_CAPACITY_STEP

        model.set_dms_backend(self.backend)
        model.dms_cuda_graphs = self.family.cuda_graphs
        model.set_dms_eviction(self.family.evict)
        model.set_dms_borrowed_channel(not self.family.press_on_engine)
        if getattr(model, "dms_zero_decision_rows", False):  # a base checkpoint: untrained DMS draws its rows
            from dms_perf.model.calibrate import draw_decision_rows
            from dms_perf.train.retrofit import zero_borrowed_channel

            if self.family.calibrated:
                draw_decision_rows(model, model.dms_source["seed"])
            else:
                zero_borrowed_channel(model)
        if self.family.calibrated:
            model.config.dms_initial_alpha_offset = self.calibration(model).alpha_offset
        elif (offset := getattr(model, "dms_loaded_alpha_offset", None)) is not None:
            model.config.dms_initial_alpha_offset = offset
        model.dms_capacity_step = DEFAULT_CAPACITY_STEP
        model.use_kv_pool(None)
        model.release_decode_graph()

    def press_for(self, model, input_ids: torch.Tensor):
        """A fresh kvpress press for this prompt, or None (raises ImportError without kvpress)."""
        if self.family.make_press is None:
            return None
        return self.family.make_press(self.ratio, model, input_ids)


def resolve_method(name: str) -> Method:
    """``"snapkv:0.5"`` -> Method; unknown family or bad parameter -> ValueError listing valid names."""
    if not isinstance(name, str):
        raise TypeError(f"method name must be a str, got {type(name).__name__}")
    family_name, sep, param = name.strip().partition(":")
    family = FAMILIES.get(family_name)
    if family is None:
        raise ValueError(f"unknown method {name!r}; valid methods: {valid_names()}")
    if not family.takes_parameter:
        if sep:
            raise ValueError(f"method {family.name!r} takes no parameter (got {name!r}); valid methods: "
                             f"{valid_names()}")
        return Method(family)
    if not sep:
        return Method(family, family.default_ratio)
    try:
        ratio = float(param)
    except ValueError:
        raise ValueError(f"bad parameter in {name!r}: expected a ratio in [0, 1); valid methods: "
                         f"{valid_names()}") from None
    if not 0.0 <= ratio < 1.0:
        raise ValueError(f"bad parameter in {name!r}: ratio {ratio} not in [0, 1); valid methods: "
                         f"{valid_names()}")
    if family.calibrated and ratio == 0.0:
        raise ValueError(f"bad parameter in {name!r}: {family.name} calibrates eviction to a fraction in (0, 1); "
                         f"0 evicts nothing (that is dense-triton); valid methods: {valid_names()}")
    return Method(family, ratio)


def group_by_backend(methods: list[Method]) -> dict[str | None, list[Method]]:
    """The methods per model backend, in the order of their first method: the methods of one backend share
    the model built for it, one model alive at a time (``dms-perf bench`` and ``capacity``)."""
    groups: dict[str | None, list[Method]] = {}
    for m in methods:
        groups.setdefault(m.backend, []).append(m)
    return groups


def resolve_methods(names) -> list[Method]:
    """Resolve a sequence of names (or a comma-separated string), keeping order, dropping repeats."""
    if isinstance(names, str):
        names = [n for n in names.split(",") if n.strip()]
    methods: dict[str, Method] = {}
    for n in names:
        m = resolve_method(n)
        methods.setdefault(m.name, m)
    if not methods:
        raise ValueError(f"no methods given; valid methods: {valid_names()}")
    return list(methods.values())


# --- models the methods run on -----------------------------------------------------------------


def is_model_path(model: str) -> bool:
    return model not in MODEL_CHOICES


def weights_note(model: str, methods, target_cr: float | None) -> str:
    """The weights of a run, as its results say: a checkpoint's, or random ones, "eviction calibrated" only
    where a method that evicts ran (dense-triton alone evicts nothing, whatever its offset)."""
    calibrated = [m.name for m in methods if m.family.calibrated]
    extra = f"; {', '.join(calibrated)}: eviction calibrated on these weights" if calibrated else ""
    if is_model_path(model):
        missing = dms_fields_missing(model) if any(m.is_dms for m in methods) else []
        if missing:
            extra += f"; its config has no {', '.join(missing)}: the DMS methods use docs/DMS.md's defaults"
        return f"real weights from {model}{extra}"
    if target_cr and any(m.evicts and not m.family.calibrated for m in methods):
        return f"random weights, eviction calibrated to {target_cr:g}x{extra}"
    return f"random weights{extra}"


def dms_fields_missing(model: str) -> list[str]:
    """The DMS config fields (docs/DMS.md, "Config fields") a checkpoint's config lacks: all of them for a
    plain Qwen3 base model; [] for a random model or where the config cannot be read here."""
    from dms_perf.model.qwen3_dms import DMS_FIELDS

    if not is_model_path(model):
        return []
    try:
        config = config_of(model)
    except (OSError, ValueError):
        return []
    return [name for name in DMS_FIELDS if getattr(config, name, None) is None]


def dms_config_of(model: str):
    """A checkpoint's config with the DMS fields it lacks set to docs/DMS.md's defaults (``DMS_DEFAULTS``), so
    that a plain Qwen3 base model loads as Qwen3-DMS."""
    from dms_perf.model.qwen3_dms import DMS_DEFAULTS

    config = config_of(model)
    for name, value in DMS_DEFAULTS.items():
        if getattr(config, name, None) is None:
            setattr(config, name, value)
    return config


HUB_TIMEOUT_S = 5.0  # seconds the hub may take to answer whether a --model hub id exists
# namespace/name, as a hub id is written (a path that does not exist but reads so is checked on the hub too)
_HUB_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]*/[A-Za-z0-9][A-Za-z0-9_.-]*")


def check_model(model: str) -> None:
    """Raise ValueError, in seconds and in words, when ``model`` cannot be loaded: a random model's name,
    a checkpoint directory (with config.json) or a hub id that is cached or that the hub knows.

    ``dms-perf bench`` calls it once before any cell, so that a wrong ``--model`` is one error rather
    than a row of errors per cell (and not minutes of transformers retrying an unreachable hub).
    """
    if model in MODEL_CHOICES:
        return
    from pathlib import Path

    path = Path(model).expanduser()
    if path.exists():
        if not path.is_dir():
            raise ValueError(f"--model {model} is a file, not a checkpoint directory (config.json and the weights)")
        if not (path / "config.json").is_file():
            raise ValueError(f"--model {model} holds no checkpoint: there is no config.json in that directory")
        return
    if not _HUB_ID.fullmatch(model):
        raise ValueError(f"--model {model}: no such directory (expected {', '.join(map(repr, MODEL_CHOICES))}, "
                         "a checkpoint directory or a hub id such as nvidia/Qwen3-8B-DMS-8x)")
    _check_hub_model(model)


def _check_hub_model(repo: str) -> None:
    import huggingface_hub
    from huggingface_hub import constants
    from huggingface_hub.errors import GatedRepoError, HFValidationError, RepositoryNotFoundError

    where = f"--model {repo}: no such directory, and as a hub id"
    try:
        cached = huggingface_hub.try_to_load_from_cache(repo, "config.json")
    except HFValidationError as exc:
        raise ValueError(f"{where} it is not valid: {exc}") from None
    if isinstance(cached, str):  # in the local cache: transformers loads it from there
        return
    fetch = f"download it where the hub is reachable (`hf download {repo} --local-dir DIR`) and pass --model DIR"
    if constants.HF_HUB_OFFLINE:
        raise ValueError(f"{where} it is not in the local Hugging Face cache ({constants.HF_HUB_CACHE}) and "
                         f"HF_HUB_OFFLINE is set, so it cannot be downloaded; {fetch}")
    try:
        huggingface_hub.model_info(repo, timeout=HUB_TIMEOUT_S)
    except GatedRepoError:
        raise ValueError(f"{where} it is gated: log in with an account that has access (`hf auth login`) or "
                         f"{fetch}") from None
    except RepositoryNotFoundError:
        raise ValueError(f"{where} the hub ({constants.ENDPOINT}) has no model {repo!r} (or it is private)") from None
    except HFValidationError as exc:
        raise ValueError(f"{where} it is not valid: {exc}") from None
    except Exception as exc:  # DNS, refused or timed-out connection, proxy, hub error: not reachable now
        detail = f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"
        raise ValueError(f"{where} it cannot be downloaded: the Hugging Face hub ({constants.ENDPOINT}) did not "
                         f"answer within {HUB_TIMEOUT_S:g} s ({detail}); {fetch}") from None


def config_of(model: str):
    """The config of ``model``: a random model's (``model_config``) or a checkpoint's config.json (a
    directory or a hub id), read without loading the weights."""
    if not is_model_path(model):
        return model_config(model)
    from transformers import Qwen3Config

    return Qwen3Config.from_pretrained(model)


def model_config(model: str):
    """Config of a random-weight model: ``"tiny"`` or ``"qwen3-8b"`` (the Qwen3-8B-DMS shape)."""
    from dms_perf.model import qwen3_dms as api

    if model == "tiny":
        return api.tiny_config()
    if model == "qwen3-8b":
        return api.qwen3_8b_config()
    raise ValueError(f"unknown random model {model!r}: expected one of {MODEL_CHOICES} or a checkpoint path")


# The backend every calibration runs on: the released code's prefill. All DMS backends then evict with
# the one offset it finds, so that they are compared on the same evictions.
CALIBRATION_BACKEND = "hub"
_CALIBRATIONS: dict[tuple, Any] = {}


# Tokens of the calibration prompt (calibrate_dms's default), fewer where the model has fewer positions.
CALIBRATION_TOKENS = 1024


def calibration_for(model: str, *, dtype: torch.dtype, device, seed: int, target_cr: float):
    """The eviction offset of ``model``'s weights that marks ``1 - 1/target_cr`` of the tokens (docs/DMS.md,
    "Random weights"): ``dms_perf.model.calibrate.calibrate_dms`` with its defaults (a prompt of seeded random
    ids, seed 0) on a fresh model of ``CALIBRATION_BACKEND``, eviction on, without the engine's fusions, so that it
    depends on nothing but its key: model (random weights of ``seed``, or a checkpoint, its missing DMS
    fields at their defaults), target, dtype and device (and that backend). Found once per key and process;
    the model it ran on is freed before this returns."""
    from dms_perf.model import qwen3_dms as api
    from dms_perf.model.calibrate import calibrate_dms, decision_rows_are_zero, draw_decision_rows

    key = (model, seed, float(target_cr), dtype, str(torch.device(device)), CALIBRATION_BACKEND)
    if key not in _CALIBRATIONS:
        if is_model_path(model):
            fresh = api.load_model(model, backend=CALIBRATION_BACKEND, dtype=dtype, device=device,
                                   config=dms_config_of(model))
        else:
            fresh = api.build_model(model_config(model), backend=CALIBRATION_BACKEND, dtype=dtype, device=device,
                                    seed=seed)
        fresh.set_dms_eviction(True)
        drawn = is_model_path(model) and decision_rows_are_zero(fresh)
        if drawn:  # as Method.prepare does on the run's model: the same rows for the same seed
            draw_decision_rows(fresh, seed)
        tokens = min(CALIBRATION_TOKENS, getattr(fresh.config, "max_position_embeddings", None) or CALIBRATION_TOKENS)
        calibration = calibrate_dms(fresh, target_cr=target_cr, num_tokens=tokens)
        if drawn:
            calibration = replace(calibration, decision_rows=f"drawn at random (seed {seed}): the "
                                              "checkpoint's are all zero")
        _CALIBRATIONS[key] = calibration
        del fresh
        gc.collect()
        if HAS_CUDA:
            torch.cuda.empty_cache()
    return _CALIBRATIONS[key]


def calibration_record(calibration) -> dict[str, float]:
    """A calibration as results files record it (``meta["calibration"][backend]``)."""
    return {"alpha_offset": calibration.alpha_offset, "marked_fraction": calibration.marked_fraction,
            "target_cr": calibration.target_cr, "compression_ratio": calibration.compression_ratio,
            "decision_rows": calibration.decision_rows}


def load_model_for(model: str, method: Method, *, dtype: torch.dtype, device, seed: int = 0,
                   target_cr: float | None = None):
    """A fresh model for ``method``, in the state ``method.prepare`` sets: random ``tiny`` / ``qwen3-8b``
    weights or a local checkpoint. Returns (model, calibration or None).

    With random weights, a DMS backend and ``target_cr``, eviction is calibrated (``calibration_for``) so
    that ``1 - 1/target_cr`` of the tokens are marked; every DMS backend gets the same weights for a seed
    and the same offset. A checkpoint whose config lacks the DMS fields (a plain Qwen3) gets docs/DMS.md's
    defaults for a DMS backend. ``model.dms_source`` records what the weights came from, for the calibrated
    families (``Method.calibration``). Families with ``fused`` get Liger's kernels where they run
    (``model.dms_fused_kernels`` says whether they did) and fused projections
    (``dms_perf.model.fused.apply_engine_fusions``). The methods of one backend may share the model:
    each one's ``prepare`` puts it back into its own state.
    """
    from dms_perf.model import qwen3_dms as api
    from dms_perf.model.fused import apply_engine_fusions

    calibration = None
    if is_model_path(model):
        config = dms_config_of(model) if method.is_dms else None
        built = api.load_model(model, backend=method.backend, dtype=dtype, device=device, config=config)
    else:
        if method.is_dms and target_cr:
            calibration = calibration_for(model, dtype=dtype, device=device, seed=seed, target_cr=target_cr)
        built = api.build_model(model_config(model), backend=method.backend, dtype=dtype, device=device, seed=seed)
        if calibration is not None:
            built.config.dms_initial_alpha_offset = calibration.alpha_offset
    if method.is_dms:
        from dms_perf.model.calibrate import decision_rows_are_zero

        built.dms_loaded_alpha_offset = built.config.dms_initial_alpha_offset  # what prepare restores
        built.dms_zero_decision_rows = is_model_path(model) and decision_rows_are_zero(built)
        built.dms_source = {"model": model, "seed": seed, "device": device}
        if method.family.fused:
            apply_engine_fusions(built)
    method.prepare(built)
    return built, calibration
