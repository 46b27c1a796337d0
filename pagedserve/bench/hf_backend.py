"""The baseline users would otherwise run: transformers' own generate() in static batches
(left padding, each batch run to its longest request), as vLLM's own hf baseline does."""

from __future__ import annotations

import time
from typing import Any, Optional, Union

import torch

from pagedserve.bench.datasets import BenchRequest


def load_hf_model(model_dir: str, dtype: Union[str, torch.dtype], device: Optional[str]) -> tuple[Any, str, int]:
    """transformers' model on the bench device (default: cuda if present): (model, device, pad
    token id for batching). `dtype` is a torch dtype or a bench --dtype name."""
    from transformers import AutoModelForCausalLM

    from pagedserve.bench.common import dtype_of

    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    if not isinstance(dtype, torch.dtype):
        dtype = dtype_of(dtype, device)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=dtype,
                                                 local_files_only=True).to(device).eval()
    pad = model.generation_config.pad_token_id
    return model, device, 0 if pad is None else pad


def static_batches(reqs: list[BenchRequest], max_batch_size: int, max_len: int) -> list[list[BenchRequest]]:
    """Group requests in order, closing a batch at max_batch_size or when its padded
    prompt + longest output would pass max_len (vLLM's run_hf rule)."""
    batches, cur = [], []
    p_max = o_max = 0
    for r in reqs:
        if cur and (len(cur) >= max_batch_size or max(p_max, r.prompt_len) + max(o_max, r.output_len) > max_len):
            batches.append(cur)
            cur, p_max, o_max = [], 0, 0
        cur.append(r)
        p_max, o_max = max(p_max, r.prompt_len), max(o_max, r.output_len)
    if cur:
        batches.append(cur)
    return batches


@torch.inference_mode()
def hf_generate_batch(model: Any, batch: list[BenchRequest], pad_id: int, device: str,
                      max_new_tokens: Optional[int] = None) -> None:
    width = max(r.prompt_len for r in batch)
    ids = torch.full((len(batch), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(batch), width), dtype=torch.long)
    for i, r in enumerate(batch):  # left padding
        ids[i, width - r.prompt_len:] = torch.tensor(r.prompt_token_ids)
        mask[i, width - r.prompt_len:] = 1
    new = max_new_tokens or max(r.output_len for r in batch)
    # min_new_tokens = max_new_tokens: EOS never ends a batch early (ignore_eos).
    model.generate(input_ids=ids.to(device), attention_mask=mask.to(device), do_sample=False,
                   max_new_tokens=new, min_new_tokens=new, pad_token_id=pad_id, use_cache=True)


def run_hf(model: Any, reqs: list[BenchRequest], max_batch_size: int, max_len: int, pad_id: int, device: str,
           progress: bool = True) -> float:
    from tqdm.auto import tqdm

    batches = static_batches(reqs, max_batch_size, max_len)
    bar = tqdm(total=len(reqs), desc="hf generate", disable=not progress, dynamic_ncols=True)
    t = time.perf_counter()
    for batch in batches:
        hf_generate_batch(model, batch, pad_id, device)
        bar.update(len(batch))
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    elapsed = time.perf_counter() - t
    bar.close()
    return elapsed
