"""The `pagedserve` command: generate, chat, verify, serve, bench, random-model."""

from __future__ import annotations

import argparse
import json
import logging
import sys
from typing import Optional, Sequence

from pagedserve.config import LOAD_FORMATS, LOGPROBS_MODES, METRICS_PREFIXES, EngineArgs
from pagedserve.engine.scheduler import SCHEDULING_POLICIES
from pagedserve.entrypoints.openai.tool_calls import TOOL_PARSER_NAMES
from pagedserve.reasoning import REASONING_PARSERS


def _bool_flag(parser: argparse.ArgumentParser, name: str, default: bool, help: str) -> None:
    parser.add_argument(f"--{name}", action=argparse.BooleanOptionalAction, default=default, help=help)


def _json_dict(text: str) -> dict:
    try:
        value = json.loads(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(f"not JSON: {e}") from None
    if not isinstance(value, dict):
        raise argparse.ArgumentTypeError("expected a JSON object")
    return value


def add_engine_args(p: argparse.ArgumentParser) -> None:
    """vLLM's engine flags, for every subcommand that builds an engine."""
    d = EngineArgs()
    p.add_argument("--tokenizer", default=None, help="tokenizer directory (default: the model's)")
    p.add_argument("--dtype", default=d.dtype, choices=["auto", "float32", "bfloat16", "float16", "half", "float"])
    p.add_argument("--seed", type=int, default=d.seed)
    p.add_argument("--max-model-len", type=int, default=None)
    p.add_argument("--block-size", type=int, default=d.block_size)
    p.add_argument("--max-num-seqs", type=int, default=d.max_num_seqs)
    p.add_argument("--max-num-batched-tokens", type=int, default=None)
    _bool_flag(p, "enable-prefix-caching", d.enable_prefix_caching, "automatic prefix caching")
    _bool_flag(p, "enable-chunked-prefill", d.enable_chunked_prefill, "chunked prefill")
    p.add_argument("--long-prefill-token-threshold", type=int, default=d.long_prefill_token_threshold,
                   help="at most this many prompt tokens of one request a step (0: no limit)")
    p.add_argument("--scheduling-policy", default=d.scheduling_policy, choices=list(SCHEDULING_POLICIES),
                   help="priority: requests' `priority` field orders the queue (lower first) and lower-priority "
                   "running requests are preempted for higher ones")
    p.add_argument("--gpu-memory-utilization", type=float, default=d.gpu_memory_utilization)
    p.add_argument("--kv-cache-memory-bytes", type=int, default=None)
    p.add_argument("--kv-cache-dtype", default="auto", choices=["auto", "fp8", "fp8_e4m3"],
                   help="fp8: K/V stored in FP8 e4m3, twice the tokens in the same memory")
    p.add_argument("--mamba-ssm-cache-dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"],
                   help="dtype of linear-attention layers' recurrent state (Qwen3-Next, Qwen3.5); auto: the model's")
    p.add_argument("--state-cache-slots", type=int, default=None,
                   help="prefix caching for models with per-request states (Qwen3.5, Granite 4.0-H, ...): prompt "
                   "states kept (default: min(max-num-seqs, 64))")
    p.add_argument("--quantization", "-q", default=None,
                   choices=["fp8", "gptq", "gptq_marlin", "awq", "awq_marlin", "compressed-tensors"],
                   help="default: the checkpoint's own; fp8 on an unquantized checkpoint quantizes its linear "
                   "layers to FP8 as they load")
    p.add_argument("--device", default=None, choices=["cpu", "cuda"])
    p.add_argument("--enforce-eager", action="store_true", help="no CUDA graphs")
    _bool_flag(p, "kv-sharing-fast-prefill", d.kv_sharing_fast_prefill, "Gemma 4: layers reading an earlier "
               "layer's KV run on the rows whose outputs are read only")
    p.add_argument("--max-logprobs", type=int, default=d.max_logprobs)
    p.add_argument("--logprobs-mode", default=d.logprobs_mode, choices=LOGPROBS_MODES,
                   help="what logprobs report: the model's distribution (raw) or the one tokens are drawn from "
                   "(processed: after penalties, temperature, top-k/p), as log-probabilities or logits")
    p.add_argument("--attention-backend", default=None, choices=["torch", "cpu", "triton"])
    _bool_flag(p, "async-scheduling", None, "schedule step N+1 before step N's tokens are back (default: on "
               "CUDA)")
    p.add_argument("--speculative-config", type=_json_dict, default=None,
                   help='speculative decoding, vLLM\'s JSON: \'{"method": "ngram", "num_speculative_tokens": 4, '
                   '"prompt_lookup_max": 4}\', or a draft model: \'{"model": DIR, "num_speculative_tokens": 3}\'')
    p.add_argument("--enable-lora", action="store_true", help="serve LoRA adapters (PEFT format) on the model")
    p.add_argument("--max-loras", type=int, default=d.max_loras, help="distinct adapters in one batch")
    p.add_argument("--max-lora-rank", type=int, default=d.max_lora_rank)
    p.add_argument("--max-cpu-loras", type=int, default=None,
                   help="adapters no request uses that stay loaded (default: max_loras)")
    p.add_argument("--load-format", default=d.load_format, choices=LOAD_FORMATS,
                   help="dummy: random weights, no checkpoint read (a config.json and tokenizer suffice)")
    p.add_argument("--enable-prompt-embeds", action="store_true",
                   help="prompts given as input embeddings ({'prompt_embeds': tensor}; /v1/completions' base64 "
                   "prompt_embeds): only for trusted clients, as in vLLM")
    p.add_argument("--worker-extension-cls", default=None,
                   help="'module.Class' whose methods join the worker's (called by name through collective_rpc)")
    p.add_argument("--logits-processors", nargs="+", default=None, metavar="MODULE:CLASS",
                   help="custom logits processor classes run on every step's logits (vLLM's interface; see "
                   "pagedserve/logits_processor.py); requests pass them arguments in vllm_xargs")
    p.add_argument("--enable-sleep-mode", action="store_true",
                   help="LLM.sleep() / wake_up(), and with PAGEDSERVE_SERVER_DEV_MODE=1 the server's /sleep and "
                   "/wake_up: the weights' and KV cache's device memory given back while idle")
    p.add_argument("--metrics-prefix", default=d.metrics_prefix, choices=list(METRICS_PREFIXES),
                   help="Prometheus metric names' prefix: vllm makes /metrics read as vLLM's (vllm:*), for "
                   "dashboards written for vLLM")
    p.add_argument("--runner", default=d.runner, choices=["auto", "generate", "pooling"],
                   help="pooling: an embedding model (/v1/embeddings); auto: pooling for base-model checkpoints")
    p.add_argument("--hf-overrides", type=_json_dict, default=None,
                   help="config.json values to replace, JSON (e.g. a causal LM as a reranker: "
                   '\'{"architectures": ["Qwen3ForSequenceClassification"], "classifier_from_token": ["no", "yes"]}\')')
    p.add_argument("--limit-mm-per-prompt", type=_json_dict, default=None,
                   help='images a prompt may carry for a vision-language model (LLaVA, Qwen2-VL), JSON: '
                   '\'{"image": 2}\'; \'{"image": 0}\' serves it text-only, without loading its vision tower '
                   '(default: no limit)')
    p.add_argument("--mm-processor-kwargs", type=_json_dict, default=None,
                   help='image processor settings replacing preprocessor_config.json\'s, JSON (e.g. Qwen2-VL\'s '
                   'image size cap: \'{"max_pixels": 1003520}\')')
    p.add_argument("--pooler-config", type=_json_dict, default=None,
                   help='embedding pooling, JSON: \'{"pooling_type": "LAST" | "MEAN" | "CLS", "normalize": true}\'')
    p.add_argument("--trust-remote-code", action="store_true",
                   help="accepted for vLLM's command lines; pagedserve never runs a checkpoint's own code")
    p.add_argument("--tensor-parallel-size", "-tp", type=int, default=1, help="1 only: one device")
    p.add_argument("--pipeline-parallel-size", "-pp", type=int, default=1, help="1 only: one device")
    p.add_argument("--cuda-graph-sizes", type=int, nargs="+", default=None,
                   help="decode batch sizes captured as CUDA graphs: N (1, 2, 4, then every 8 up to N) or a list")
    # vLLM's flags with nothing to do on one device: accepted (and logged as ignored) or checked
    # (config.compat_notes), so a copied vLLM command line runs.
    p.add_argument("--data-parallel-size", "-dp", type=int, default=1, help="1 only: one device")
    p.add_argument("--distributed-executor-backend", default=None, help="ignored: one process")
    p.add_argument("--disable-custom-all-reduce", action="store_true", help="ignored: no all-reduce")
    p.add_argument("--enable-expert-parallel", action="store_true", help="ignored: one device holds every expert")
    p.add_argument("--swap-space", type=float, default=None, help="ignored: preempted requests recompute")
    p.add_argument("--max-seq-len-to-capture", type=int, default=None, help="ignored: graphs serve any length")
    p.add_argument("-O", "--compilation-config", default=None, help="ignored: no torch.compile")
    p.add_argument("--cpu-offload-gb", type=float, default=0, help="0 only")
    p.add_argument("--preemption-mode", default=None, help="recompute only")
    p.add_argument("--tokenizer-mode", default=d.tokenizer_mode, help="auto / hf / slow: a Hugging Face tokenizer")
    p.add_argument("--generation-config", default=d.generation_config,
                   help="where requests' sampling defaults come from: auto (the model's generation_config.json: "
                   "temperature, top_p, top_k, min_p, repetition_penalty, max_new_tokens), vllm (none: "
                   "SamplingParams' own), or a directory holding a generation_config.json")
    p.add_argument("--override-generation-config", type=_json_dict, default=None,
                   help='sampling defaults set over the generation config, JSON: \'{"temperature": 0.5}\'')
    p.add_argument("--reasoning-parser", choices=list(REASONING_PARSERS), default=None,
                   help="a thinking model's <think>...</think> (openai_gptoss: GPT-OSS's analysis channel): the "
                   "server puts it in the chat message's reasoning_content, and structured outputs start after a "
                   "<think> block (default: openai_gptoss for GPT-OSS models when serving)")


def engine_args_from(ns: argparse.Namespace, model: str) -> EngineArgs:
    kwargs = {f: getattr(ns, f) for f in EngineArgs.field_names() if f != "model" and hasattr(ns, f)}
    return EngineArgs(model=model, **kwargs)


def _generate(ns: argparse.Namespace) -> int:
    from pagedserve import LLM, SamplingParams
    from pagedserve.demo import resolve_model

    args = engine_args_from(ns, resolve_model(ns.model))
    llm = LLM(**vars(args))
    params = SamplingParams(temperature=ns.temperature, top_p=ns.top_p, top_k=ns.top_k, max_tokens=ns.max_tokens,
                            seed=ns.sampling_seed, ignore_eos=ns.ignore_eos)
    prompts = ns.prompt or ["Hello, my name is"]
    for out in llm.generate(prompts, params, use_tqdm=False):
        c = out.outputs[0]
        print(f"{out.prompt}{c.text}")
        print(f"  [{len(c.token_ids)} tokens, finish_reason={c.finish_reason}]", file=sys.stderr)
    return 0


def _chat(ns: argparse.Namespace) -> int:
    from pagedserve import LLM, SamplingParams
    from pagedserve.demo import resolve_model
    from pagedserve.entrypoints.chat import run_chat

    llm = LLM(**vars(engine_args_from(ns, resolve_model(ns.model))))
    params = SamplingParams(temperature=ns.temperature, top_p=ns.top_p, top_k=ns.top_k, max_tokens=ns.max_tokens,
                            seed=ns.sampling_seed)
    return run_chat(llm, params, system=ns.system)


def _verify(ns: argparse.Namespace) -> int:
    from pagedserve.demo import resolve_model
    from pagedserve.entrypoints.verify import main_verify

    return main_verify(resolve_model(ns.model), ns.prompt, ns.max_tokens, ns.tie_tol, ns.logprob_tol)


def _serve(ns: argparse.Namespace) -> int:
    from pagedserve.entrypoints.openai.api_server import run_server

    if ns.enable_auto_tool_choice and ns.tool_call_parser is None:
        raise SystemExit("pagedserve serve: --enable-auto-tool-choice needs --tool-call-parser.")

    return run_server(ns)


LLAVA_NEXT_PINPOINTS = [[56, 112], [112, 56], [112, 112]]


def _random_model(ns: argparse.Namespace) -> int:
    from pagedserve.model.random_model import (build_random_gemma4_vl, build_random_internvl, build_random_llama4_vl,
                                               build_random_llava, build_random_mistral3, build_random_model,
                                               build_random_qwen2_vl)

    qwen_vl = {"Qwen2VLForConditionalGeneration": "2", "Qwen2_5_VLForConditionalGeneration": "2.5",
               "Qwen3VLForConditionalGeneration": "3"}
    if ns.arch == "LlavaForConditionalGeneration":  # a tiny CLIP tower on a tiny Llama: images in 16 tokens
        build_random_llava(ns.path, image_size=56, seed=ns.seed, dtype=ns.dtype)
        print(ns.path)
        return 0
    if ns.arch == "LlavaNextForConditionalGeneration":  # the same, tiling images to 1x2, 2x1 or 2x2 tiles
        build_random_llava(ns.path, image_size=56, seed=ns.seed, dtype=ns.dtype, pinpoints=LLAVA_NEXT_PINPOINTS)
        print(ns.path)
        return 0
    if ns.arch == "LlavaOnevisionForConditionalGeneration":  # the same tiles, a SigLIP tower on a Qwen2, 2x2 downscaled
        build_random_llava(ns.path, text_model_type="qwen2", image_size=56, select_strategy="full", feature_layer=-1,
                           seed=ns.seed, dtype=ns.dtype, vision="siglip", pinpoints=LLAVA_NEXT_PINPOINTS, max_patches=2)
        print(ns.path)
        return 0
    if ns.arch == "InternVLForConditionalGeneration":  # a tiny InternViT on a tiny Qwen2: 1 to 5 tiles of 4 tokens
        build_random_internvl(ns.path, seed=ns.seed, dtype=ns.dtype)
        print(ns.path)
        return 0
    if ns.arch == "Mistral3ForConditionalGeneration":  # a tiny Pixtral tower on a tiny Mistral: 4 to 16 tokens
        build_random_mistral3(ns.path, seed=ns.seed, dtype=ns.dtype)
        print(ns.path)
        return 0
    if ns.arch == "Gemma4ForConditionalGeneration":  # a tiny Gemma 4 tower and decoder: images in up to 70 tokens
        build_random_gemma4_vl(ns.path, seed=ns.seed, dtype=ns.dtype)
        print(ns.path)
        return 0
    if ns.arch == "Llama4ForConditionalGeneration":  # a tiny Llama 4 tower and decoder: 1 to 5 tiles of 4 tokens
        build_random_llama4_vl(ns.path, seed=ns.seed, dtype=ns.dtype)
        print(ns.path)
        return 0
    if ns.arch in qwen_vl:  # a tiny vision transformer on a tiny Qwen2 with M-RoPE: images in 1 to 64 tokens
        build_random_qwen2_vl(ns.path, version=qwen_vl[ns.arch], seed=ns.seed, dtype=ns.dtype)
        print(ns.path)
        return 0
    build_random_model(ns.path, ns.arch, hidden_size=ns.hidden_size, intermediate_size=ns.intermediate_size,
                       num_layers=ns.num_layers, num_heads=ns.num_heads, num_kv_heads=ns.num_kv_heads,
                       vocab_size=ns.vocab_size, tokenizer_vocab=ns.tokenizer_vocab, seed=ns.seed, dtype=ns.dtype)
    print(ns.path)
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="pagedserve", description="LLM inference and serving engine")
    sub = parser.add_subparsers(dest="command", required=True)

    g = sub.add_parser("generate", help="generate completions for prompts, offline")
    g.add_argument("model", nargs="?", default=None,
                   help="local Hugging Face model directory (default: the built-in demo model)")
    g.add_argument("--prompt", action="append", help="a prompt (repeat for several)")
    g.add_argument("--max-tokens", type=int, default=64)
    g.add_argument("--temperature", type=float, default=0.0)
    g.add_argument("--top-p", type=float, default=1.0)
    g.add_argument("--top-k", type=int, default=0)
    g.add_argument("--sampling-seed", type=int, default=None, help="per-request sampling seed")
    g.add_argument("--ignore-eos", action="store_true")
    add_engine_args(g)
    g.set_defaults(func=_generate)

    c = sub.add_parser("chat", help="interactive chat in the terminal, streamed (Ctrl-D or Ctrl-C quits)")
    c.add_argument("model", nargs="?", default=None,
                   help="local Hugging Face model directory with a chat template (default: the built-in demo model)")
    c.add_argument("--system", default=None, help="a system message to start the conversation with")
    c.add_argument("--max-tokens", type=int, default=256, help="most tokens per reply")
    c.add_argument("--temperature", type=float, default=0.0)
    c.add_argument("--top-p", type=float, default=1.0)
    c.add_argument("--top-k", type=int, default=0)
    c.add_argument("--sampling-seed", type=int, default=None, help="per-reply sampling seed")
    add_engine_args(c)
    c.set_defaults(func=_chat)

    v = sub.add_parser("verify", help="check that pagedserve and transformers agree on a model (greedy, float32, CPU)")
    v.add_argument("model", nargs="?", default=None,
                   help="local Hugging Face model directory (default: the built-in demo model)")
    v.add_argument("--prompt", action="append", help="a prompt (repeat for several; default: a built-in few)")
    v.add_argument("--max-tokens", type=int, default=16, help="greedy tokens per prompt")
    v.add_argument("--tie-tol", type=float, default=1e-3,
                   help="a differing token is tolerated when transformers' logits of the two are this close")
    v.add_argument("--logprob-tol", type=float, default=1e-2, help="largest accepted |logprob difference|")
    v.set_defaults(func=_verify)

    b = sub.add_parser("bench", help="benchmarks: throughput, latency, serve")
    bsub = b.add_subparsers(dest="bench_command", required=True)
    from pagedserve.bench import latency, throughput

    for name, mod, text in (("throughput", throughput, "offline throughput through the LLM API"),
                            ("latency", latency, "latency of one fixed batch")):
        bp = bsub.add_parser(name, help=text)
        mod.add_args(bp)
        add_engine_args(bp)
        bp.set_defaults(func=mod.main)
    from pagedserve.bench import serve as bench_serve

    sp = bsub.add_parser("serve", help="drive a running OpenAI-compatible server over HTTP")
    bench_serve.add_args(sp)
    sp.set_defaults(func=bench_serve.main)
    from pagedserve.bench import soak

    so = bsub.add_parser("soak", help="reliability soak: many streaming clients with disconnects, in rounds; "
                         "checks nothing is lost or leaked")
    soak.add_args(so)
    so.set_defaults(func=soak.main)

    s = sub.add_parser("serve", help="OpenAI-compatible HTTP server (FastAPI + uvicorn)")
    s.add_argument("model", nargs="?", default=None, help="local Hugging Face model directory")
    s.add_argument("--host", default="0.0.0.0", help="address to listen on (default: all interfaces)")
    s.add_argument("--port", type=int, default=8000)
    s.add_argument("--served-model-name", nargs="+", default=None,
                   help="model name(s) clients use (default: MODEL_DIR, or pagedserve-demo for the demo "
                   "model); responses carry the first")
    s.add_argument("--api-key", default=None,
                   help="require 'Authorization: Bearer KEY' on /v1/* (default: $PAGEDSERVE_API_KEY)")
    s.add_argument("--chat-template", default=None, help="chat template file or inline Jinja template "
                   "(default: the tokenizer's)")
    s.add_argument("--uvicorn-log-level", default="info",
                   choices=["critical", "error", "warning", "info", "debug", "trace"])
    s.add_argument("--shutdown-timeout", type=float, default=0.0,
                   help="seconds in-flight requests may still run after SIGTERM/SIGINT before they are "
                   "aborted (each stream then ends with finish_reason 'abort')")
    s.add_argument("--response-role", default="assistant",
                   help="the role of chat replies after a generation prompt (vLLM's; default assistant)")
    s.add_argument("--max-log-len", type=int, default=None,
                   help="with --enable-log-requests: logged prompts cut to this many characters and token ids")
    s.add_argument("--enable-log-requests", action="store_true",
                   help="log every request with its prompt and parameters (off: prompts never reach the logs)")
    s.add_argument("--disable-log-requests", action="store_true",
                   help="vLLM's older flag, accepted: requests are not logged unless --enable-log-requests")
    s.add_argument("--disable-log-stats", action="store_true",
                   help="no stats line every 10 s (throughput, running / waiting requests, KV cache usage, "
                   "prefix cache hit rate)")
    s.add_argument("--trust-request-chat-template", action="store_true",
                   help="accept a chat_template in requests (off: such a request is a 400)")
    s.add_argument("--enable-auto-tool-choice", action="store_true",
                   help='allow tool_choice "auto" (the model decides to call tools; needs --tool-call-parser)')
    s.add_argument("--tool-call-parser", choices=list(TOOL_PARSER_NAMES), default=None,
                   help="how tool calls are read from the model's text: hermes (<tool_call>{...}</tool_call>, "
                   "Hermes and Qwen2.5 models), llama3_json ({\"name\": ..., \"parameters\": ...}, Llama 3.1/3.2), "
                   "mistral ([TOOL_CALLS][...]), pythonic ([f(x=1), ...], Llama 3.2/4), qwen3_coder "
                   "(<function=f><parameter=x>...</parameter></function>, Qwen3-Coder), granite "
                   "(<|tool_call|>[...], Granite 3), phi4_mini_json (functools[...], Phi-4-mini), glm45 (<tool_call>NAME"
                   "<arg_key>..., GLM-4.5 / 4.6), deepseek_v3 / "
                   "deepseek_v31 (<｜tool▁calls▁begin｜>..., DeepSeek-V3 / R1-0528 / V3.1), kimi_k2, minimax_m2 "
                   "(<minimax:tool_call><invoke name=...>, MiniMax-M2), seed_oss (<seed:tool_call><function=...>, "
                   "Seed-OSS), hunyuan_a13b (<tool_calls>[...], Hunyuan-A13B), xlam ([{\"name\": ..., "
                   "\"arguments\": ...}], xLAM), qwen3_xml (as qwen3_coder) or openai (GPT-OSS's "
                   "harmony messages to=functions.NAME)")
    s.add_argument("--return-tokens-as-token-ids", action="store_true",
                   help='logprob tokens as "token_id:N" (a request\'s return_tokens_as_token_ids overrides it)')
    s.add_argument("--enable-force-include-usage", action="store_true",
                   help="every stream ends with a usage chunk, as if stream_options.include_usage were set")
    s.add_argument("--lora-modules", nargs="+", default=None, metavar="NAME=PATH",
                   help="LoRA adapters to serve, each under its own model name: name=path or "
                   "'{\"name\": ..., \"path\": ...}' (needs --enable-lora)")
    from pagedserve.entrypoints.openai.limits import ServerLimits

    ServerLimits.add_cli_args(s.add_argument_group("request limits"))
    from pagedserve.entrypoints.openai.http_options import HttpOptions

    HttpOptions.add_cli_args(s.add_argument_group("HTTP: CORS, TLS, headers"))
    add_engine_args(s)
    s.set_defaults(func=_serve)

    r = sub.add_parser("random-model", help="write a random-weight model directory (for tests and benchmarks)")
    r.add_argument("path")
    r.add_argument("--arch", default="LlamaForCausalLM",
                   help="a causal LM's architecture, or a vision-language one (LlavaForConditionalGeneration, "
                        "LlavaNextForConditionalGeneration, LlavaOnevisionForConditionalGeneration, "
                        "Mistral3ForConditionalGeneration, Gemma4ForConditionalGeneration, "
                        "Llama4ForConditionalGeneration, "
                        "Qwen2VLForConditionalGeneration, "
                        "Qwen2_5_VLForConditionalGeneration, Qwen3VLForConditionalGeneration, "
                        "InternVLForConditionalGeneration): a tiny model")
    r.add_argument("--hidden-size", type=int, default=64)
    r.add_argument("--intermediate-size", type=int, default=128)
    r.add_argument("--num-layers", type=int, default=2)
    r.add_argument("--num-heads", type=int, default=4)
    r.add_argument("--num-kv-heads", type=int, default=2)
    r.add_argument("--vocab-size", type=int, default=None, help="default: the tokenizer's size")
    r.add_argument("--tokenizer-vocab", type=int, default=1024)
    r.add_argument("--seed", type=int, default=0)
    r.add_argument("--dtype", default="float32")
    r.set_defaults(func=_random_model)
    return parser


def main(argv: Optional[Sequence[str]] = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(asctime)s %(name)s: %(message)s")
    ns = build_parser().parse_args(argv)
    try:
        return ns.func(ns)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:  # Ctrl-C while loading: no traceback
        print(file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
