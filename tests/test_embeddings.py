"""Embeddings (pooling models): vectors equal transformers' last_hidden_state pooled the same
way, across chunked prefill and prefix-cache hits, for every pooling type."""

from __future__ import annotations

import json

import pytest
import torch

from pagedserve import LLM, PoolingParams, SamplingParams
from pagedserve.errors import ParamError


def _prompts():
    return [[(17 * i + 5 * j) % 1000 + 4 for j in range(n)] for i, n in enumerate((3, 40, 77, 130))]


def _hidden(model_dir: str) -> "callable":
    from transformers import AutoModel

    hf = AutoModel.from_pretrained(model_dir, dtype=torch.float32).eval()

    def run(ids):
        with torch.inference_mode():
            return hf(torch.tensor([ids])).last_hidden_state[0].double()

    return run


def _close(got: list[float], want: torch.Tensor) -> None:
    torch.testing.assert_close(torch.tensor(got, dtype=torch.float64), want, rtol=1e-4, atol=2e-5)


def test_base_model_checkpoint_embeds_with_last_token(base_dir):
    llm = LLM(base_dir, max_num_batched_tokens=32, block_size=8)  # long prompts take several chunks
    assert llm.llm_engine.config.runner == "pooling"
    hidden = _hidden(base_dir)
    prompts = _prompts()
    outs = llm.embed([{"prompt_token_ids": p} for p in prompts], use_tqdm=False)
    for p, o in zip(prompts, outs):
        assert o.prompt_token_ids == p and o.finished
        _close(o.outputs.embedding, torch.nn.functional.normalize(hidden(p)[-1], dim=-1))
    # Again: the prefix cache serves all but the last block, and the vectors stay the same.
    again = llm.embed([{"prompt_token_ids": p} for p in prompts], use_tqdm=False)
    assert again[3].num_cached_tokens == 128
    for a, b in zip(outs, again):
        _close(a.outputs.embedding, torch.tensor(b.outputs.embedding, dtype=torch.float64))
    short = llm.embed({"prompt_token_ids": prompts[2]}, PoolingParams(dimensions=16), use_tqdm=False)[0]
    _close(short.outputs.embedding, torch.nn.functional.normalize(hidden(prompts[2])[-1][:16], dim=-1))
    kv = llm.llm_engine.kv
    assert kv.pool.num_free_blocks == kv.num_blocks


@pytest.mark.parametrize("pooling_type", ["MEAN", "CLS"])
def test_mean_and_cls_pooling_across_chunks(llama_dir, pooling_type):
    llm = LLM(llama_dir, runner="pooling", pooler_config={"pooling_type": pooling_type, "normalize": False},
              max_num_batched_tokens=32, block_size=8)
    hidden = _hidden(llama_dir)
    prompts = _prompts()
    for _ in range(2):  # the second round would hit the prefix cache, if these pooling types used it
        outs = llm.embed([{"prompt_token_ids": p} for p in prompts], use_tqdm=False)
        for p, o in zip(prompts, outs):
            h = hidden(p)
            _close(o.outputs.embedding, h.mean(0) if pooling_type == "MEAN" else h[0])
            assert o.num_cached_tokens == 0


def test_mean_pooling_survives_preemption(llama_dir):
    """A KV cache too small for the batch: requests are preempted mid-prompt and recomputed;
    the mean must restart with them, not count their first chunks twice."""
    per_block = 2 * 2 * 8 * 2 * 16 * 4  # layers x (K, V) x block_size x kv heads x head_dim x float32
    # Async scheduling plans a step before the last one lands, so a request whose prompt is done
    # still holds its blocks while the next one needs more: it is preempted.
    llm = LLM(llama_dir, runner="pooling", pooler_config={"pooling_type": "MEAN", "normalize": False},
              max_num_batched_tokens=64, block_size=8, kv_cache_memory_bytes=20 * per_block, async_scheduling=True)
    assert llm.llm_engine.kv.num_blocks == 20
    hidden = _hidden(llama_dir)
    prompts = [[(5 * i + 3 * j) % 1000 + 4 for j in range(100)] for i in range(4)]
    outs = llm.embed([{"prompt_token_ids": p} for p in prompts], use_tqdm=False)
    assert llm.llm_engine.scheduler.num_preemptions > 0
    for p, o in zip(prompts, outs):
        _close(o.outputs.embedding, hidden(p).mean(0))


def test_sentence_transformers_settings(llama_dir, tmp_path):
    from pagedserve.model.pooler import PoolerConfig, resolve_pooler_config

    d = tmp_path / "st"
    (d / "1_Pooling").mkdir(parents=True)
    (d / "modules.json").write_text(json.dumps([
        {"idx": 0, "name": "0", "path": "", "type": "sentence_transformers.models.Transformer"},
        {"idx": 1, "name": "1", "path": "1_Pooling", "type": "sentence_transformers.models.Pooling"},
        {"idx": 2, "name": "2", "path": "2_Normalize", "type": "sentence_transformers.models.Normalize"}]))
    (d / "1_Pooling" / "config.json").write_text(json.dumps({"pooling_mode_mean_tokens": True,
                                                             "pooling_mode_cls_token": False}))
    assert resolve_pooler_config(str(d), None) == PoolerConfig("MEAN", True)
    assert resolve_pooler_config(str(d), {"pooling_type": "cls"}) == PoolerConfig("CLS", True)
    assert resolve_pooler_config(str(tmp_path), None) == PoolerConfig("LAST", True)
    for bad, match in (({"pooling_type": "MAX"}, "pooling_type"), ({"normalise": True}, "unknown key")):
        with pytest.raises(ValueError, match=match):
            resolve_pooler_config(str(d), bad)


def test_errors_name_the_field(llama_dir, base_dir):
    gen = LLM(llama_dir)
    with pytest.raises(ParamError, match="pooling model"):
        gen.embed("hello", use_tqdm=False)
    emb = LLM(base_dir, max_model_len=64)
    with pytest.raises(ParamError, match="embedding model"):
        emb.generate("hello", SamplingParams(max_tokens=2), use_tqdm=False)
    with pytest.raises(ParamError, match="dimensions"):
        emb.embed("hello", PoolingParams(dimensions=10_000), use_tqdm=False)
    with pytest.raises(ParamError, match="longer than the maximum model length"):
        emb.embed({"prompt_token_ids": [5] * 65}, use_tqdm=False)
    assert len(emb.embed({"prompt_token_ids": [5] * 64}, use_tqdm=False)[0].outputs.embedding) == 64
    with pytest.raises(ParamError, match="dimensions"):
        PoolingParams(dimensions=0)
    with pytest.raises(ValueError, match="pooler_config needs runner='pooling'"):
        LLM(llama_dir, pooler_config={"pooling_type": "MEAN"})
    # An aborted embedding request leaves nothing behind.
    engine = emb.llm_engine
    rid = engine.add_request(None, {"prompt_token_ids": [7] * 40}, PoolingParams())
    engine.abort_request(rid)
    assert engine.get_num_unfinished_requests() == 0 and not engine.has_unfinished_requests()
    engine.step()
    assert engine.kv.pool.num_free_blocks == engine.kv.num_blocks


def test_async_scheduling_gives_the_same_vectors(base_dir):
    """With async scheduling the next step is planned before a prompt's last chunk lands: the
    request must not be scheduled again (it has no token to decode)."""
    prompts = [{"prompt_token_ids": p} for p in _prompts()]
    sync = LLM(base_dir, max_num_batched_tokens=32, block_size=8).embed(prompts, use_tqdm=False)
    llm = LLM(base_dir, max_num_batched_tokens=32, block_size=8, async_scheduling=True)
    sched = llm.llm_engine.scheduler
    orig, past_prompt = sched.schedule, []

    def spy():
        out = orig()
        past_prompt.extend(s for s in out.scheduled if s.start >= s.request.num_prompt_tokens)
        return out

    sched.schedule = spy
    got = llm.embed(prompts, use_tqdm=False)
    assert not past_prompt
    for a, b in zip(sync, got):
        assert a.outputs.embedding == b.outputs.embedding
    assert llm.llm_engine.kv.pool.num_free_blocks == llm.llm_engine.kv.num_blocks
