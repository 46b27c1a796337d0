"""`pagedserve verify MODEL_DIR`: does pagedserve compute what transformers computes?

Both load the directory in float32 on CPU. pagedserve decodes a few prompts greedily; then
transformers reads each prompt plus pagedserve's tokens in one teacher-forced pass, so every
position is compared on the same prefix: pagedserve's token must be transformers' argmax (or
within `tie_tol` of it in transformers' own logits: a near-tie float round-off may flip), and
pagedserve's log-probability of its token must match transformers' log_softmax."""

from __future__ import annotations

import logging
import math
import sys
from dataclasses import dataclass, field
from typing import Any, Optional, Sequence, TextIO

logger = logging.getLogger("pagedserve")

DEFAULT_PROMPTS = ["The", "Python is a programming language that", "def fibonacci(n):",
                   "Hello, my name is"]


@dataclass
class Divergence:
    position: int  # index into the generated tokens
    pagedserve_token: int
    transformers_token: int
    logit_gap: float  # transformers' logit of its choice minus that of pagedserve's
    tolerated: bool


@dataclass
class PromptResult:
    prompt: str
    num_tokens: int
    max_logprob_diff: Optional[float]  # None when pagedserve returned no logprobs
    divergences: list[Divergence] = field(default_factory=list)

    @property
    def agrees(self) -> bool:
        return all(d.tolerated for d in self.divergences)


@dataclass
class VerifyReport:
    model: str
    results: list[PromptResult] = field(default_factory=list)
    error: Optional[str] = None  # set when the model could not be loaded or run

    @property
    def max_logprob_diff(self) -> Optional[float]:
        diffs = [r.max_logprob_diff for r in self.results if r.max_logprob_diff is not None]
        return max(diffs) if diffs else None

    def passed(self, logprob_tol: float) -> bool:
        if self.error is not None or not self.results:
            return False
        lp = self.max_logprob_diff
        return all(r.agrees for r in self.results) and (lp is None or lp <= logprob_tol)


def _chosen_logprobs(completion: Any) -> Optional[list[float]]:
    """pagedserve's log-probability of each token it generated (vLLM's per-token dicts)."""
    lps = getattr(completion, "logprobs", None)
    if not lps:
        return None
    return [float(step[t].logprob) for t, step in zip(completion.token_ids, lps)]


def _chat_prompt(tokenizer: Any) -> list[str]:
    """One conversation rendered with the model's chat template, if it has one: it exercises
    the special tokens a chat model sees most."""
    if not getattr(tokenizer, "chat_template", None):
        return []
    try:
        return [tokenizer.apply_chat_template([{"role": "user", "content": "What is a list?"}],
                                              add_generation_prompt=True, tokenize=False)]
    except Exception:  # a template that needs other fields: plain prompts suffice
        return []


def run_verify(model_dir: str, prompts: Sequence[str] = DEFAULT_PROMPTS, max_tokens: int = 16,
               tie_tol: float = 1e-3) -> VerifyReport:
    """Compare pagedserve with transformers on `prompts`; load errors end up in `report.error`."""
    import torch

    report = VerifyReport(model_dir)
    try:
        from pagedserve import LLM, SamplingParams

        llm = LLM(model=model_dir, dtype="float32", device="cpu", max_num_seqs=len(prompts) + 1,
                  kv_cache_memory_bytes=64 << 20)
        prompts = list(prompts) + _chat_prompt(llm.get_tokenizer())
        # logprobs=0: the chosen token's raw logprob only (vLLM semantics).
        params = SamplingParams(temperature=0.0, max_tokens=max_tokens, ignore_eos=True, logprobs=0)
        outs = llm.generate(list(prompts), params, use_tqdm=False)
    except Exception as e:  # any load failure is a verdict, not a crash
        report.error = f"pagedserve could not load or run {model_dir!r}: {e}"
        return report
    try:
        from transformers import AutoModelForCausalLM

        hf = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32, local_files_only=True).eval()
    except Exception as e:
        report.error = f"transformers could not load {model_dir!r}: {e}"
        return report
    for prompt, out in zip(prompts, outs):
        report.results.append(_compare(hf, prompt, out, tie_tol))
    return report


def _compare(hf: Any, prompt: str, out: Any, tie_tol: float) -> PromptResult:
    import torch

    c = out.outputs[0]
    ids = list(out.prompt_token_ids) + list(c.token_ids)
    n = len(out.prompt_token_ids)
    with torch.inference_mode():
        logits = hf(torch.tensor([ids])).logits[0, n - 1:-1].float()  # row i predicts generated token i
    logprobs = torch.log_softmax(logits, dim=-1)
    result = PromptResult(prompt, len(c.token_ids), None)
    for i, t in enumerate(c.token_ids):
        best = int(logits[i].argmax())
        if best != t:
            gap = float(logits[i, best] - logits[i, t])
            result.divergences.append(Divergence(i, t, best, gap, gap < tie_tol))
    ours = _chosen_logprobs(c)
    if ours is not None:
        theirs = logprobs[torch.arange(len(c.token_ids)), torch.tensor(c.token_ids)].tolist()
        result.max_logprob_diff = max((abs(a - b) for a, b in zip(ours, theirs)), default=0.0)
        if math.isnan(result.max_logprob_diff):
            result.max_logprob_diff = math.inf
    return result


def print_report(report: VerifyReport, tokenizer: Any, logprob_tol: float, out: Optional[TextIO] = None) -> None:
    out = out or sys.stdout  # looked up per call, so redirection (tests, callers) is honoured
    def tok(t: int) -> str:
        return f"{t} {tokenizer.decode([t])!r}" if tokenizer is not None else str(t)

    print(f"verify {report.model}: pagedserve vs transformers, float32 on CPU, greedy", file=out)
    if report.error:
        print(f"FAIL: {report.error}", file=out)
        return
    for r in report.results:
        lp = "n/a (no logprobs from pagedserve)" if r.max_logprob_diff is None else f"{r.max_logprob_diff:.3g}"
        state = "tokens agree" if not r.divergences else ("near-tie only" if r.agrees else "TOKENS DIFFER")
        print(f"  {r.prompt!r}: {r.num_tokens} tokens, {state}; max |logprob diff| {lp}", file=out)
        if r.divergences:
            d = r.divergences[0]
            note = "a near-tie, tolerated" if d.tolerated else "not a near-tie"
            print(f"    first divergence at generated token {d.position}: pagedserve {tok(d.pagedserve_token)}, "
                  f"transformers {tok(d.transformers_token)} (transformers' logit gap {d.logit_gap:.3g}: {note})",
                  file=out)
    lp = report.max_logprob_diff
    lp_text = "n/a" if lp is None else f"{lp:.3g}"
    if report.passed(logprob_tol):
        print(f"PASS: greedy tokens agree on {len(report.results)} prompts; max |logprob diff| {lp_text}", file=out)
    elif not all(r.agrees for r in report.results):
        bad = sum(not r.agrees for r in report.results)
        print(f"FAIL: greedy tokens differ from transformers on {bad} of {len(report.results)} prompts "
              f"(max |logprob diff| {lp_text}): pagedserve does not compute what transformers computes "
              "for this model.", file=out)
    else:
        print(f"FAIL: max |logprob diff| {lp_text} exceeds the tolerance {logprob_tol:g}.", file=out)


def main_verify(model_dir: str, prompts: Optional[Sequence[str]] = None, max_tokens: int = 16,
                tie_tol: float = 1e-3, logprob_tol: float = 1e-2, out: Optional[TextIO] = None) -> int:
    """Run, print, and return the exit code: 0 when pagedserve agrees with transformers."""
    report = run_verify(model_dir, prompts or DEFAULT_PROMPTS, max_tokens, tie_tol)
    tokenizer = None
    if report.error is None:
        from pagedserve.tokenizer import load_tokenizer

        tokenizer = load_tokenizer(model_dir)
    print_report(report, tokenizer, logprob_tol, out)
    return 0 if report.passed(logprob_tol) else 1
