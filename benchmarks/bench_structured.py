"""The cost of structured outputs: a batch of requests held to a JSON schema against the same
batch unconstrained, each request given the same number of output tokens, in one process.
Prints both times, the ratio, and the schema's compile time (first and cached).

    python benchmarks/bench_structured.py [--model DIR] [--num-prompts 64] [--items 24]
"""

from __future__ import annotations

import argparse
import json
import time

from pagedserve import LLM, SamplingParams
from pagedserve.bench.common import add_batch_args, machine_info, random_token_prompts, write_json
from pagedserve.bench.models import bench_model_dir
from pagedserve.structured_outputs import StructuredOutputsParams


def main() -> None:
    ap = argparse.ArgumentParser()
    add_batch_args(ap, output_len=None)
    ap.add_argument("--items", type=int, default=24, help="the schema's array length (sets the output length)")
    ns = ap.parse_args()
    llm = LLM(bench_model_dir(ns.model), enable_prefix_caching=False, seed=0)
    vocab = llm.llm_engine.config.vocab_size
    tok = llm.get_tokenizer()
    prompts = random_token_prompts(vocab, ns.num_prompts, ns.input_len)
    # A fixed-size record per item, so every request's output has a known shape and ends by itself.
    schema = {"type": "array", "minItems": ns.items, "maxItems": ns.items, "items": {
        "type": "object", "properties": {"id": {"type": "integer", "minimum": 0, "maximum": 99},
                                         "ok": {"type": "boolean"}}, "required": ["id", "ok"],
        "additionalProperties": False}}
    so = StructuredOutputsParams(json=schema, disable_any_whitespace=True)

    compiler = llm.llm_engine.grammar_compiler
    t = time.perf_counter()
    compiler.compile(so)
    compile_first = time.perf_counter() - t
    t = time.perf_counter()
    compiler.compile(so)
    compile_cached = time.perf_counter() - t

    constrained = SamplingParams(temperature=0.0, max_tokens=4096 // 4, structured_outputs=so)
    llm.generate(prompts[:4], constrained, use_tqdm=False)  # warm-up
    times: dict[str, list[float]] = {"unconstrained": [], "json_schema": []}
    lengths: list[int] = []
    for _ in range(ns.repeats):  # interleaved, so drift hits both alike
        t = time.perf_counter()
        outs = llm.generate(prompts, constrained, use_tqdm=False)
        times["json_schema"].append(time.perf_counter() - t)
        for o in outs:  # complete and valid, or this raises (decoded alone: a random prompt can end
            # inside a UTF-8 character, which then leads the output's text)
            json.loads(tok.decode(o.outputs[0].token_ids, skip_special_tokens=True))
        lengths = [len(o.outputs[0].token_ids) for o in outs]
        plain = [SamplingParams(temperature=0.0, max_tokens=n, ignore_eos=True) for n in lengths]
        t = time.perf_counter()
        llm.generate(prompts, plain, use_tqdm=False)
        times["unconstrained"].append(time.perf_counter() - t)
    u, j = min(times["unconstrained"]), min(times["json_schema"])
    tokens = sum(lengths)
    print(f"unconstrained: {u:.2f} s   json schema: {j:.2f} s   ratio {j / u:.2f}x  ({ns.num_prompts} requests, "
          f"{ns.input_len} in, {tokens} out in all, {min(lengths)}-{max(lengths)} each)")
    print(f"schema compile: {compile_first * 1e3:.1f} ms first, {compile_cached * 1e3:.2f} ms cached")
    write_json(ns.output_json, {"bench": "structured_outputs", "unconstrained_s": u, "json_schema_s": j,
                                "ratio": j / u, "output_tokens": tokens, "num_prompts": ns.num_prompts,
                                "input_len": ns.input_len, "items": ns.items, "compile_first_ms": compile_first * 1e3,
                                "compile_cached_ms": compile_cached * 1e3, "machine": machine_info()})


if __name__ == "__main__":
    main()
