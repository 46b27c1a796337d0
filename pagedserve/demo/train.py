"""Train the demo model: a small Llama-shaped transformer with its own byte-level BPE tokenizer,
on the text CPython ships (see pagedserve/demo/corpus.py), on CPU, reproducibly from a seed.

    python -m pagedserve.demo.train --out pagedserve/demo/model

One thread is enough and leaves the machine usable; the defaults take about 40 minutes on one
core of a 2020s x86 server (the step count, not the clock, decides when training ends, so a run
is reproducible)."""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import platform
import random
import sys
import time
from dataclasses import asdict, dataclass
from typing import Any, Optional, Sequence

logger = logging.getLogger("pagedserve.demo.train")

EOT = "<|endoftext|>"
END_OF_TURN = "<|im_end|>"


@dataclass
class TrainConfig:
    seed: int = 0
    vocab_size: int = 4096
    hidden_size: int = 256
    intermediate_size: int = 768
    num_layers: int = 6
    num_heads: int = 4
    num_kv_heads: int = 2
    max_position_embeddings: int = 1024
    seq_len: int = 1024
    batch_size: int = 4
    steps: int = 1000
    lr: float = 2e-3
    min_lr_ratio: float = 0.1
    warmup_steps: int = 100
    weight_decay: float = 0.1
    chat_repeats: int = 2  # each question/answer pair appears this often, in different phrasings
    chat_share: float = 0.4  # fraction of training windows drawn from the chat conversations
    val_every: int = 250
    threads: int = 1
    amp_dtype: str = "bfloat16"  # autocast matmuls (2x faster on CPUs with AVX512-BF16); "float32": off
    save_dtype: str = "bfloat16"
    # Distillation (the demo's draft model): a teacher model dir, and the weight of the KL
    # divergence from the teacher's next-token distribution in the loss (the rest: cross entropy).
    teacher: str = ""
    distill: float = 0.0


def build_corpus(tok: Any, cfg: TrainConfig) -> dict[str, Any]:
    """Token streams for plain text and chats, one document after another, each ended by
    <|endoftext|>; every 50th document is held out for validation."""
    import numpy as np

    from pagedserve.demo.corpus import chat_conversations, text_documents

    texts = text_documents()
    chats = [tok.apply_chat_template(c, tokenize=False) for c in chat_conversations(cfg.seed, cfg.chat_repeats)]
    eot = tok.convert_tokens_to_ids(EOT)
    streams: dict[str, Any] = {}
    for name, docs in (("text", texts), ("chat", chats)):
        ids = tok(docs, add_special_tokens=False)["input_ids"]
        for split, keep in (("train", lambda i: i % 50 != 7), ("val", lambda i: i % 50 == 7)):
            flat = [t for i, d in enumerate(ids) if keep(i) for t in d + [eot]]
            streams[f"{name}_{split}"] = np.asarray(flat, dtype=np.int64)
    return streams


def sample_batch(stream: Any, n: int, seq_len: int, gen: Any) -> Any:
    """n random windows of seq_len + 1 tokens (inputs and shifted labels)."""
    import torch

    starts = torch.randint(0, len(stream) - seq_len - 1, (n,), generator=gen).tolist()
    return torch.stack([torch.from_numpy(stream[s:s + seq_len + 1]) for s in starts])


def lr_at(step: int, cfg: TrainConfig) -> float:
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    progress = (step - cfg.warmup_steps) / max(1, cfg.steps - cfg.warmup_steps)
    return cfg.lr * (cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress)))


def make_model(tok: Any, cfg: TrainConfig) -> Any:
    from transformers import LlamaConfig, LlamaForCausalLM

    eos = [tok.convert_tokens_to_ids(END_OF_TURN), tok.convert_tokens_to_ids(EOT)]
    config = LlamaConfig(
        vocab_size=len(tok), hidden_size=cfg.hidden_size, intermediate_size=cfg.intermediate_size,
        num_hidden_layers=cfg.num_layers, num_attention_heads=cfg.num_heads, num_key_value_heads=cfg.num_kv_heads,
        max_position_embeddings=cfg.max_position_embeddings, tie_word_embeddings=True, initializer_range=0.02,
        bos_token_id=None, eos_token_id=eos, pad_token_id=tok.pad_token_id,
    )
    config.architectures = ["LlamaForCausalLM"]
    return LlamaForCausalLM(config)


def evaluate(model: Any, streams: dict[str, Any], cfg: TrainConfig, batches: int = 4) -> dict[str, float]:
    """Mean loss on fixed held-out windows (same windows every time: a fixed generator)."""
    import torch

    out = {}
    model.eval()
    with torch.no_grad():
        for name in ("text", "chat"):
            gen = torch.Generator().manual_seed(1234)
            losses = []
            for _ in range(batches):
                x = sample_batch(streams[f"{name}_val"], cfg.batch_size, cfg.seq_len, gen)
                losses.append(float(_loss(model, x, cfg.amp_dtype)))
            out[name] = sum(losses) / len(losses)
    model.train()
    return out


def _loss(model: Any, x: Any, amp_dtype: str = "float32", teacher: Any = None, distill: float = 0.0) -> Any:
    """Next-token cross entropy over a [batch, seq_len + 1] window; with a teacher, mixed with
    the KL divergence from the teacher's distribution (weight `distill`), per token."""
    import contextlib

    import torch
    import torch.nn.functional as F

    amp = (torch.autocast("cpu", dtype=getattr(torch, amp_dtype)) if amp_dtype != "float32"
           else contextlib.nullcontext())
    with amp:
        logits = model(input_ids=x[:, :-1]).logits
    logits = logits.reshape(-1, logits.shape[-1]).float()
    ce = F.cross_entropy(logits, x[:, 1:].reshape(-1))
    if teacher is None or distill == 0:
        return ce
    with torch.no_grad(), amp:
        target = teacher(input_ids=x[:, :-1]).logits
    target = target.reshape(-1, target.shape[-1]).float().log_softmax(-1)
    kl = F.kl_div(logits.log_softmax(-1), target, log_target=True, reduction="batchmean")
    return (1 - distill) * ce + distill * kl


def train(out_dir: str, cfg: TrainConfig) -> dict[str, Any]:
    import torch

    from pagedserve.model.random_model import build_tokenizer

    torch.set_num_threads(cfg.threads)
    random.seed(cfg.seed)
    torch.manual_seed(cfg.seed)
    t0 = time.time()
    os.makedirs(out_dir, exist_ok=True)

    from pagedserve.demo.corpus import chat_conversations, text_documents

    # The tokenizer learns from the plain text and the chats' words alike.
    chat_text = [m["content"] for c in chat_conversations(cfg.seed, 1) for m in c]
    tok = build_tokenizer(out_dir, cfg.vocab_size, text_documents() + chat_text)
    streams = build_corpus(tok, cfg)
    sizes = {k: int(len(v)) for k, v in streams.items()}
    logger.info("tokenizer: %d tokens; corpus tokens: %s (%.0fs)", len(tok), sizes, time.time() - t0)

    model = make_model(tok, cfg)
    teacher = None
    if cfg.teacher:
        from transformers import AutoModelForCausalLM

        teacher = AutoModelForCausalLM.from_pretrained(cfg.teacher, dtype=torch.float32).eval()
        if teacher.config.vocab_size != len(tok):
            raise ValueError(f"the teacher's vocabulary ({teacher.config.vocab_size}) is not the tokenizer's "
                             f"({len(tok)}).")
    n_params = sum(p.numel() for p in model.parameters())
    logger.info("model: %.2fM parameters, %s", n_params / 1e6, model.config.to_diff_dict())
    decay = [p for p in model.parameters() if p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.dim() < 2]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": cfg.weight_decay},
                             {"params": no_decay, "weight_decay": 0.0}], lr=cfg.lr, betas=(0.9, 0.95))
    gen = torch.Generator().manual_seed(cfg.seed)
    n_chat = round(cfg.batch_size * cfg.chat_share)
    model.train()
    t_train, ema, history = time.time(), None, []
    for step in range(cfg.steps):
        for g in opt.param_groups:
            g["lr"] = lr_at(step, cfg)
        x = torch.cat([sample_batch(streams["text_train"], cfg.batch_size - n_chat, cfg.seq_len, gen),
                       sample_batch(streams["chat_train"], n_chat, cfg.seq_len, gen)])
        loss = _loss(model, x, cfg.amp_dtype, teacher, cfg.distill)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        loss_value = loss.item()
        ema = loss_value if ema is None else 0.95 * ema + 0.05 * loss_value
        if step % 20 == 0 or step == cfg.steps - 1:
            el = time.time() - t_train
            logger.info("step %d/%d loss %.3f (ema %.3f) lr %.2e  %.0f tok/s  %.1f min", step, cfg.steps,
                        loss_value, ema, lr_at(step, cfg), (step + 1) * cfg.batch_size * cfg.seq_len / el, el / 60)
        if (step + 1) % cfg.val_every == 0 or step == cfg.steps - 1:
            val = evaluate(model, streams, cfg)
            history.append({"step": step + 1, "train_ema": round(ema, 4), **{f"val_{k}": round(v, 4) for k, v in val.items()}})
            logger.info("val at step %d: %s", step + 1, val)
    minutes = (time.time() - t0) / 60
    info = save(model, tok, out_dir, cfg, history, minutes, n_params, sizes)
    logger.info("saved %s in %.1f minutes", out_dir, minutes)
    return info


def save(model: Any, tok: Any, out_dir: str, cfg: TrainConfig, history: list, minutes: float, n_params: int,
         sizes: dict[str, int]) -> dict[str, Any]:
    import torch
    from transformers import GenerationConfig

    model.config.dtype = cfg.save_dtype
    model.to(getattr(torch, cfg.save_dtype)).save_pretrained(out_dir)
    eos = model.config.eos_token_id
    GenerationConfig(eos_token_id=eos, pad_token_id=tok.pad_token_id, bos_token_id=None).save_pretrained(out_dir)
    info = {
        "what": "pagedserve demo model, trained by `python -m pagedserve.demo.train`",
        "data": "CPython's pydoc_data.topics and standard-library docstrings (PSF licence), plus chats derived from them",
        "python": platform.python_version(), "torch": torch.__version__, "parameters": n_params,
        "corpus_tokens": sizes, "train_config": asdict(cfg), "wall_minutes": round(minutes, 1), "history": history,
    }
    with open(os.path.join(out_dir, "training_info.json"), "w") as f:
        json.dump(info, f, indent=1)
    return info


def parse_args(argv: Optional[Sequence[str]]) -> tuple[str, TrainConfig]:
    p = argparse.ArgumentParser(prog="python -m pagedserve.demo.train", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", required=True, help="output model directory")
    for name, value in asdict(TrainConfig()).items():
        p.add_argument(f"--{name.replace('_', '-')}", type=type(value), default=value)
    ns = p.parse_args(argv)
    return ns.out, TrainConfig(**{k: getattr(ns, k) for k in asdict(TrainConfig())})


def main(argv: Optional[Sequence[str]] = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", stream=sys.stdout)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    out, cfg = parse_args(argv)
    train(out, cfg)
    return 0


if __name__ == "__main__":
    sys.exit(main())
