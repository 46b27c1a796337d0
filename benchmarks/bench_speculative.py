"""Speculative decoding (n-gram, and the demo's draft model) against plain decoding, batch 1,
in one process, each prompt through every engine in turn: ms per output token, the ratio,
the share of drafts accepted, and (greedy) a check that the tokens are the same; sampled
runs (--temperature) check only that every request got its tokens. Two workloads on the demo
model (a small trained model, so that it copies text the way language models do):
  copy: a passage of the Python docs, then its first line again (the model tends to go on
        copying: what prompt lookup is for);
  free: the passage's first line alone (drafts only from what the model repeats).
Method "replay" (greedy only) drafts the plain engine's own continuation with draft
(done % (k + 2)) made wrong, `done` the tokens generated so far, so that every number of
accepted drafts occurs (k = 3: 1.8 of 3 stand on average): not a real proposer, it measures
what verification costs at a known acceptance rate (on a random model, such as a hybrid's,
where no proposer's drafts stand).

    python benchmarks/bench_speculative.py [--model DIR --draft DIR] [--prompts 8] [--output-len 128] [--k 2 3]
"""

from __future__ import annotations

import argparse
import time

from pagedserve import LLM, SamplingParams
from pagedserve.bench.common import machine_info, write_json
from pagedserve.demo import demo_draft_path
from pagedserve.engine.ngram import NgramProposer, SpeculativeConfig


class ReplayProposer(NgramProposer):
    """Drafts a known continuation of each prompt, draft done % (k + 2) made wrong."""

    def __init__(self, k: int) -> None:
        super().__init__(SpeculativeConfig(num_speculative_tokens=k))
        self.reference: dict[tuple, list[int]] = {}

    def propose(self, req, max_tokens: int) -> list[int]:
        k, done = self.cfg.num_speculative_tokens, len(req.output_token_ids)
        d = list(self.reference.get(tuple(req.prompt_token_ids), [])[done:done + min(k, max_tokens)])
        if done % (k + 2) < len(d):
            d[done % (k + 2)] += 1
        return d


def _workloads(n: int) -> dict[str, list[str]]:
    from pydoc_data.topics import topics

    passages = [topics[k][:600] for k in sorted(topics)[5:5 + n]]
    return {"copy": [p + "\n\n" + p[:80] for p in passages], "free": [p[:80] for p in passages]}


def _interleaved(llms: dict[str, LLM], prompts: list[str], params: SamplingParams, rounds: int) -> dict:
    """Batch 1: each prompt through every engine in turn, `rounds` times; per engine the sum
    over prompts of each prompt's best time (the CPU's speed drifts: interleaving and the
    minimum keep the ratios fair), the tokens of the last round, and the drafts counted."""
    for llm in llms.values():
        llm.generate(prompts[:1], params, use_tqdm=False)  # warm-up
    best = {key: [float("inf")] * len(prompts) for key in llms}
    tokens: dict[str, list] = {key: [None] * len(prompts) for key in llms}
    counts = {key: (llm.llm_engine.scheduler.num_draft_tokens, llm.llm_engine.scheduler.num_accepted_tokens)
              for key, llm in llms.items()}
    for _ in range(rounds):
        for i, prompt in enumerate(prompts):
            for key, llm in llms.items():
                t = time.perf_counter()
                out = llm.generate([prompt], params, use_tqdm=False)[0]
                best[key][i] = min(best[key][i], time.perf_counter() - t)
                tokens[key][i] = out.outputs[0].token_ids
    return {key: {"seconds": sum(best[key]), "tokens": tokens[key],
                  "drafted": (llm.llm_engine.scheduler.num_draft_tokens - counts[key][0]) // rounds,
                  "accepted": (llm.llm_engine.scheduler.num_accepted_tokens - counts[key][1]) // rounds}
            for key, llm in llms.items()}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default=None, help="model dir (default: the demo model)")
    ap.add_argument("--prompts", type=int, default=8)
    ap.add_argument("--output-len", type=int, default=128)
    ap.add_argument("--k", type=int, nargs="+", default=[2, 3], help="num_speculative_tokens to try")
    ap.add_argument("--draft", default=None, help="a draft model dir: its configs run beside the n-gram ones "
                    "(default: the demo's draft model, pagedserve/demo/draft)")
    ap.add_argument("--methods", nargs="+", default=["ngram", "draft_model"], choices=["ngram", "suffix", "draft_model", "replay"])
    ap.add_argument("--temperature", type=float, nargs="+", default=[0.0, 0.7])
    ap.add_argument("--rounds", type=int, default=2, help="passes over the prompts; each prompt's best time counts")
    ap.add_argument("--output-json", default=None)
    ns = ap.parse_args()
    common = dict(enable_prefix_caching=False, async_scheduling=False)
    results: dict = {}
    plain = LLM(ns.model, **common)
    draft = ns.draft or demo_draft_path()
    configs = {"ngram": lambda k: {"method": "ngram", "num_speculative_tokens": k, "prompt_lookup_max": 4,
                                   "prompt_lookup_min": 2},
               "draft_model": lambda k: {"method": "draft_model", "model": draft, "num_speculative_tokens": k},
               "replay": lambda k: {"method": "ngram", "num_speculative_tokens": k},
               "suffix": lambda k: {"method": "suffix", "num_speculative_tokens": k}}
    specs = {f"{m}_k{k}": LLM(ns.model, speculative_config=configs[m](k), **common)
             for m in ns.methods for k in ns.k}
    if "replay" in ns.methods:  # the plain engine's greedy continuations, to be drafted back
        assert ns.temperature == [0.0], "replay drafts greedy continuations: --temperature 0"
        greedy = SamplingParams(temperature=0, max_tokens=ns.output_len, ignore_eos=True)
        ref = {tuple(o.prompt_token_ids): o.outputs[0].token_ids
               for ps in _workloads(ns.prompts).values() for o in plain.generate(ps, greedy, use_tqdm=False)}
        for k in ns.k:
            proposer = specs[f"replay_k{k}"].llm_engine.scheduler.proposer = ReplayProposer(k)
            proposer.reference = ref
    for temperature in ns.temperature:
        params = SamplingParams(temperature=temperature, seed=0, max_tokens=ns.output_len, ignore_eos=True)
        for name, prompts in _workloads(ns.prompts).items():
            n_tokens = ns.output_len * len(prompts)
            runs = _interleaved({"plain": plain, **specs}, prompts, params, ns.rounds)
            base = runs.pop("plain")
            row = {"plain_ms_per_token": base["seconds"] / n_tokens * 1e3}
            print(f"{name}, temperature {temperature}: plain {row['plain_ms_per_token']:.2f} ms/token")
            for key, r in runs.items():
                assert all(len(t) == ns.output_len for t in r["tokens"])
                same = r["tokens"] == base["tokens"] if temperature == 0 else None  # sampled: other draws
                row[key] = {"ms_per_token": r["seconds"] / n_tokens * 1e3, "speedup": base["seconds"] / r["seconds"],
                            "same_tokens": same, "drafted": r["drafted"], "accepted": r["accepted"]}
                print(f"  {key}: {row[key]['ms_per_token']:.2f} ms/token, {row[key]['speedup']:.2f}x, "
                      f"{r['accepted']}/{r['drafted']} drafts accepted"
                      + ("" if same is None else f", same tokens: {same}"))
            results[f"{name}_t{temperature}"] = row
    write_json(ns.output_json, {"bench": "speculative", "draft": draft if "draft_model" in ns.methods else None,
                                "results": results, "prompts": ns.prompts, "output_len": ns.output_len,
                                "rounds": ns.rounds, "model": ns.model or "demo", "machine": machine_info()})


if __name__ == "__main__":
    main()
