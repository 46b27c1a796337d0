"""N-gram speculative decoding against plain decoding, batch 1, in one process: ms per output
token, the ratio, the share of drafts accepted, and (greedy) a check that the tokens are the
same; sampled runs (--temperature) check only that every request got its tokens. Two
workloads on the demo model (a small trained model, so that it copies text the way language
models do):
  copy: a passage of the Python docs, then its first line again (the model tends to go on
        copying: what prompt lookup is for);
  free: the passage's first line alone (drafts only from what the model repeats).

    python benchmarks/bench_speculative.py [--model DIR] [--prompts 8] [--output-len 128]
"""

from __future__ import annotations

import argparse
import time

from pagedserve import LLM, SamplingParams
from pagedserve.bench.common import machine_info, write_json


def _workloads(n: int) -> dict[str, list[str]]:
    from pydoc_data.topics import topics

    passages = [topics[k][:600] for k in sorted(topics)[5:5 + n]]
    return {"copy": [p + "\n\n" + p[:80] for p in passages], "free": [p[:80] for p in passages]}


def _run(llm: LLM, prompts: list[str], params: SamplingParams) -> tuple[float, list[list[int]]]:
    llm.generate(prompts[:1], params, use_tqdm=False)  # warm-up
    t = time.perf_counter()
    outs = [llm.generate([p], params, use_tqdm=False)[0] for p in prompts]  # batch 1, one after another
    return time.perf_counter() - t, [o.outputs[0].token_ids for o in outs]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default=None, help="model dir (default: the demo model)")
    ap.add_argument("--prompts", type=int, default=8)
    ap.add_argument("--output-len", type=int, default=128)
    ap.add_argument("--k", type=int, nargs="+", default=[2, 4], help="num_speculative_tokens to try")
    ap.add_argument("--temperature", type=float, nargs="+", default=[0.0, 0.7])
    ap.add_argument("--output-json", default=None)
    ns = ap.parse_args()
    common = dict(enable_prefix_caching=False, async_scheduling=False)
    results: dict = {}
    plain = LLM(ns.model, **common)
    specs = {k: LLM(ns.model, speculative_config={"method": "ngram", "num_speculative_tokens": k,
                                                  "prompt_lookup_max": 4, "prompt_lookup_min": 2}, **common)
             for k in ns.k}
    for temperature in ns.temperature:
        params = SamplingParams(temperature=temperature, seed=0, max_tokens=ns.output_len, ignore_eos=True)
        for name, prompts in _workloads(ns.prompts).items():
            tokens = ns.output_len * len(prompts)
            base_s, base_out = _run(plain, prompts, params)
            row = {"plain_ms_per_token": base_s / tokens * 1e3}
            print(f"{name}, temperature {temperature}: plain {row['plain_ms_per_token']:.2f} ms/token")
            for k, llm in specs.items():
                sched = llm.llm_engine.scheduler
                d0, a0 = sched.num_draft_tokens, sched.num_accepted_tokens
                s, out = _run(llm, prompts, params)
                drafted, accepted = sched.num_draft_tokens - d0, sched.num_accepted_tokens - a0
                assert all(len(o) == ns.output_len for o in out)
                same = out == base_out if temperature == 0 else None  # sampled: other draws, not comparable
                row[f"k{k}"] = {"ms_per_token": s / tokens * 1e3, "speedup": base_s / s, "same_tokens": same,
                                "drafted": drafted, "accepted": accepted}
                print(f"  ngram k={k}: {s / tokens * 1e3:.2f} ms/token, {base_s / s:.2f}x, {accepted}/{drafted} "
                      f"drafts accepted" + ("" if same is None else f", same tokens: {same}"))
            results[f"{name}_t{temperature}"] = row
    write_json(ns.output_json, {"bench": "speculative_ngram", "results": results, "prompts": ns.prompts,
                                "output_len": ns.output_len, "model": ns.model or "demo", "machine": machine_info()})


if __name__ == "__main__":
    main()
