"""vLLM's speculative_config: which proposer drafts tokens, and how many a step."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional

SPEC_METHODS = ("ngram", "suffix", "draft_model", "eagle", "eagle3", "mtp")
MODEL_FREE = ("ngram", "suffix")  # proposers without a model (engine/ngram.py, engine/suffix.py)
# vLLM's other names for "mtp" (the target's own multi-token-prediction layers)
_MTP_ALIASES = ("deepseek_mtp", "glm4_moe_mtp", "qwen3_next_mtp")


@dataclass
class SpeculativeConfig:
    """method "ngram": prompt lookup (engine/ngram.py); "suffix": suffix decoding, matches in
    the request and in finished requests' outputs (engine/suffix.py); "draft_model": a smaller model with the
    target's vocabulary drafts (worker/draft_model.py); "eagle" / "eagle3": an EAGLE head drafts
    from the target's hidden states (model/eagle.py, worker/eagle_proposer.py). As in vLLM, a
    `model` with no `method` means a draft model."""

    num_speculative_tokens: int
    method: str = "ngram"
    prompt_lookup_max: int = 4
    prompt_lookup_min: int = 1
    model: Optional[str] = None  # the draft model's (or EAGLE head's) directory
    draft_tensor_parallel_size: int = 1
    # No drafts while more requests than this run (speculation costs throughput in big batches).
    disable_by_batch_size: Optional[int] = None
    enforce_eager: bool = False  # the draft model without CUDA graphs
    # The draft's context: a request drafts only while its drafts stay within it (default:
    # the target's max_model_len).
    max_model_len: Optional[int] = None
    # vLLM's hub fields: only None (nothing is downloaded) and no quantization of the draft.
    revision: Optional[str] = None
    code_revision: Optional[str] = None
    quantization: Optional[str] = None
    # Suffix decoding (vLLM's names and defaults): the longest suffix matched, the finished
    # requests' outputs kept, drafts per matched token, and the least share of earlier
    # occurrences a drafted token must have.
    suffix_decoding_max_tree_depth: int = 24
    suffix_decoding_max_cached_requests: int = 10000
    suffix_decoding_max_spec_factor: float = 1.0
    suffix_decoding_min_token_prob: float = 0.1

    @classmethod
    def from_dict(cls, d: Any) -> "SpeculativeConfig":
        if isinstance(d, cls):
            return d
        if not isinstance(d, dict):
            raise ValueError(f"speculative_config must be a dict, got {type(d).__name__}.")
        d = dict(d)
        _from_speculators(d)
        if d.get("method") is None:
            d["method"] = "draft_model" if d.get("model") is not None else "ngram"
        if d["method"] in _MTP_ALIASES:
            d["method"] = "mtp"
        method = d["method"]
        if method not in SPEC_METHODS:
            raise ValueError(f"speculative_config: method must be one of {', '.join(SPEC_METHODS)}, "
                             f"got {method!r} (Medusa heads are not available).")
        unknown = set(d) - set(cls.__dataclass_fields__)
        if unknown:
            raise ValueError(f"speculative_config: unknown key(s) {sorted(unknown)}.")
        if method == "mtp":  # (vLLM's default: the model's one MTP layer, one draft)
            d.setdefault("num_speculative_tokens", 1)
        if method == "suffix":  # (vLLM's default: as deep as the match may go)
            d.setdefault("num_speculative_tokens", min(d.get("suffix_decoding_max_tree_depth", 24), 32))
        else:
            suffix = sorted(k for k in d if k.startswith("suffix_decoding_"))
            if suffix:
                raise ValueError(f"speculative_config: {suffix} are for method 'suffix'.")
        if "num_speculative_tokens" not in d:
            raise ValueError("speculative_config needs num_speculative_tokens.")
        if method in MODEL_FREE and d.get("model") is not None:
            raise ValueError(f"speculative_config: method {method!r} takes no model.")
        if method == "mtp" and d.get("model") is not None:
            raise ValueError("speculative_config: method 'mtp' uses the target's own layers; it takes no model.")
        if method not in MODEL_FREE + ("mtp",):
            if not isinstance(d.get("model"), str) or not d["model"]:
                raise ValueError(f"speculative_config: method {method!r} needs model (the draft model's "
                                 f"directory).")
            lookup = {"prompt_lookup_max", "prompt_lookup_min"} & set(d)
            if lookup:
                raise ValueError(f"speculative_config: {sorted(lookup)} are for method 'ngram'.")
            if d.get("draft_tensor_parallel_size", 1) != 1:
                raise ValueError("speculative_config: draft_tensor_parallel_size must be 1 (one device).")
        for name in ("revision", "code_revision", "quantization"):
            if d.get(name) is not None:
                raise ValueError(f"speculative_config: {name} must be None (drafts load from a local directory, "
                                 f"as they are), got {d[name]!r}.")
        for name in ("disable_by_batch_size", "max_model_len"):
            v = d.get(name)
            if v is not None and (not isinstance(v, int) or isinstance(v, bool) or v < 1):
                raise ValueError(f"speculative_config: {name} must be a positive integer, got {v!r}.")
        cfg = cls(**d)
        _check_suffix(cfg)
        k, lo, hi = cfg.num_speculative_tokens, cfg.prompt_lookup_min, cfg.prompt_lookup_max
        if not all(isinstance(v, int) and not isinstance(v, bool) for v in (k, lo, hi)) or not (
                1 <= k <= 32 and 1 <= lo <= hi <= 32):
            raise ValueError("speculative_config: need 1 <= num_speculative_tokens <= 32 and "
                             f"1 <= prompt_lookup_min <= prompt_lookup_max <= 32, got {k}, {lo}, {hi}.")
        return cfg


def _check_suffix(cfg: SpeculativeConfig) -> None:
    depth, cached = cfg.suffix_decoding_max_tree_depth, cfg.suffix_decoding_max_cached_requests
    for name, v, lo in (("suffix_decoding_max_tree_depth", depth, 2),
                        ("suffix_decoding_max_cached_requests", cached, 0)):
        if not isinstance(v, int) or isinstance(v, bool) or v < lo:
            raise ValueError(f"speculative_config: {name} must be an integer of at least {lo}, got {v!r}.")
    factor, prob = cfg.suffix_decoding_max_spec_factor, cfg.suffix_decoding_min_token_prob
    if not isinstance(factor, (int, float)) or isinstance(factor, bool) or factor <= 0:
        raise ValueError(f"speculative_config: suffix_decoding_max_spec_factor must be positive, got {factor!r}.")
    if not isinstance(prob, (int, float)) or isinstance(prob, bool) or not 0 <= prob <= 1:
        raise ValueError(f"speculative_config: suffix_decoding_min_token_prob must be in [0, 1], got {prob!r}.")


def _from_speculators(d: dict) -> None:
    """A speculators-format head's method and draft length, where the dict leaves them out."""
    from pagedserve.model.speculators import read_speculators, speculative_tokens, speculators_method

    model = d.get("model")
    raw = read_speculators(model) if isinstance(model, str) and model else None
    if raw is None:
        return
    method = speculators_method(raw)
    if d.get("method") is None:
        d["method"] = method
    elif d["method"] != method:
        raise ValueError(f"speculative_config: {model} is a speculators {method!r} head, but method is "
                         f"{d['method']!r}.")
    k = speculative_tokens(raw)
    if "num_speculative_tokens" not in d and k is not None:
        d["num_speculative_tokens"] = k
