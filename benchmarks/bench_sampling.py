"""The cost of the full sampling pipeline: 64 requests with every knob on against the same
batch greedy, in one process. Prints both times and the ratio (target: <= 1.5x).

    python benchmarks/bench_sampling.py [--model DIR] [--num-prompts 64] [--output-len 64]
"""

from __future__ import annotations

import argparse
import time

from pagedserve import LLM, SamplingParams
from pagedserve.bench.common import add_batch_args, machine_info, random_token_prompts, write_json
from pagedserve.bench.models import bench_model_dir


def main() -> None:
    ap = argparse.ArgumentParser()
    add_batch_args(ap)
    ns = ap.parse_args()
    llm = LLM(bench_model_dir(ns.model), enable_prefix_caching=False, seed=0)
    vocab = llm.llm_engine.config.vocab_size
    prompts = random_token_prompts(vocab, ns.num_prompts, ns.input_len)
    greedy = SamplingParams(temperature=0.0, max_tokens=ns.output_len, ignore_eos=True)
    knobs = [SamplingParams(n=1, temperature=0.8, top_p=0.9, top_k=50, min_p=0.05, presence_penalty=0.5,
                            frequency_penalty=0.5, repetition_penalty=1.1, seed=i, logprobs=5,
                            logit_bias={1: 2.0, 2: -2.0}, stop=["never appears"], bad_words=["the"],
                            max_tokens=ns.output_len, ignore_eos=True)
             for i in range(ns.num_prompts)]
    llm.generate(prompts[:4], greedy, use_tqdm=False)  # warm-up
    times = {"greedy": [], "all_knobs": []}
    for _ in range(ns.repeats):  # interleaved, so drift hits both alike
        for name, params in (("greedy", greedy), ("all_knobs", knobs)):
            t = time.perf_counter()
            llm.generate(prompts, params, use_tqdm=False)
            times[name].append(time.perf_counter() - t)
    g, k = min(times["greedy"]), min(times["all_knobs"])
    print(f"greedy:    {g:.2f} s   all knobs: {k:.2f} s   ratio {k / g:.2f}x  "
          f"({ns.num_prompts} requests, {ns.input_len} in / {ns.output_len} out)")
    write_json(ns.output_json, {"bench": "sampling", "greedy_s": g, "all_knobs_s": k, "ratio": k / g,
                                "num_prompts": ns.num_prompts, "input_len": ns.input_len,
                                "output_len": ns.output_len, "machine": machine_info()})


if __name__ == "__main__":
    main()
