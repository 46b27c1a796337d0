"""Speculative decoding with EAGLE heads (model/eagle.py, worker/eagle_proposer.py): every
proposal is what a plain full-recompute implementation of the head gives from transformers'
hidden states of the target (EAGLE-1: the final normed ones; EAGLE-3: those entering three
layers, a draft vocabulary mapped by d2t), through chunked catch-up, rejections and
prefix-cache hits, over a Llama target and a hybrid (Qwen3.5) one; the target's outputs are
unchanged; waiting features never pile up; nothing leaks; bad heads are refused."""

from __future__ import annotations

import json
import os

import pytest
import torch
from engine_helpers import assert_no_leak, spy_proposals

from pagedserve import LLM, SamplingParams
from pagedserve.model.random_model import build_random_eagle_head
from pagedserve.worker.eagle_proposer import CATCH_UP_ROWS


def _rms(x: torch.Tensor, w: torch.Tensor, eps: float) -> torch.Tensor:
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps) * w


def _rope(x: torch.Tensor, theta: float) -> torch.Tensor:
    """x [tokens, heads, dim] at positions 0.. (Llama's half-split rotation)."""
    d = x.shape[-1]
    inv = 1.0 / theta ** (torch.arange(0, d, 2, dtype=torch.float) / d)
    ang = torch.arange(x.shape[0], dtype=torch.float)[:, None] * inv[None]
    cos, sin = torch.cat([ang, ang], -1).cos()[:, None], torch.cat([ang, ang], -1).sin()[:, None]
    rot = torch.cat([-x[..., d // 2:], x[..., :d // 2]], -1)
    return x * cos + rot * sin


class NaiveHead:
    """The head recomputed over the whole sequence for every draft (no cache)."""

    def __init__(self, head_dir: str, target_dir: str) -> None:
        from safetensors.torch import load_file
        from transformers import AutoModelForCausalLM

        with open(os.path.join(head_dir, "config.json")) as f:
            top = json.load(f)
        speculators = "speculators_model_type" in top  # the layer's settings nested, the head's on top
        self.cfg = dict(top.get("transformer_layer_config", top), **top) if speculators else top
        self.w = {k.replace("midlayer.", "layers.0."): v.float() if v.is_floating_point() else v
                  for k, v in load_file(os.path.join(head_dir, "model.safetensors")).items()}
        self.v3 = "d2t" in self.w
        self.residual_normed = self.cfg.get("norm_before_residual", speculators)  # (speculators' default: True)
        self.target = AutoModelForCausalLM.from_pretrained(target_dir, dtype=torch.float32).eval()
        ids = (self.cfg.get("eagle_config", {}).get("eagle_aux_hidden_state_layer_ids")
               or self.cfg.get("eagle_aux_hidden_state_layer_ids"))
        n = self.target.config.num_hidden_layers
        self.aux = ids or [2, n // 2, n - 3]

    @torch.inference_mode()
    def features(self, tokens: list[int]) -> torch.Tensor:
        if not self.v3:
            return self.target.model(torch.tensor([tokens])).last_hidden_state[0]
        seen = {}
        hooks = [layer.register_forward_pre_hook(
            lambda m, a, kw, i=i: seen.__setitem__(i, (kw.get("hidden_states") if a == () else a[0])[0]),
            with_kwargs=True) for i, layer in enumerate(self.target.model.layers)]
        try:
            self.target.model(torch.tensor([tokens]))
        finally:
            for h in hooks:
                h.remove()
        eps = self.cfg["rms_norm_eps"]
        x = torch.cat([seen[i] for i in self.aux], -1)
        if self.cfg.get("norm_before_fc"):  # (vLLM's order: the whole, then each target layer's part)
            x = _rms(x, self.w["input_norm.weight"], eps)
        if self.cfg.get("fc_norm"):
            x = torch.cat([_rms(p, self.w[f"fc_norm.{j}.weight"], eps)
                           for j, p in enumerate(x.chunk(len(self.aux), -1))], -1)
        return x @ self.w["fc.weight"].T

    def _layer(self, i: int, x: torch.Tensor, residual: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        w, c = self.w, self.cfg
        p = f"layers.{i}."
        heads, kv = c["num_attention_heads"], c["num_key_value_heads"]
        hd = c.get("head_dim") or c["hidden_size"] // heads
        t = x.shape[0]
        theta = c.get("rope_theta") or c["rope_parameters"]["rope_theta"]
        q = _rope((x @ w[p + "self_attn.q_proj.weight"].T).view(t, heads, hd), theta)
        k = _rope((x @ w[p + "self_attn.k_proj.weight"].T).view(t, kv, hd), theta)
        v = (x @ w[p + "self_attn.v_proj.weight"].T).view(t, kv, hd)
        k, v = (z.repeat_interleave(heads // kv, 1) for z in (k, v))
        scores = torch.einsum("qhd,khd->hqk", q, k) / hd ** 0.5
        scores = scores.masked_fill(torch.ones(t, t).triu(1).bool(), float("-inf"))
        a = torch.einsum("hqk,khd->qhd", scores.softmax(-1), v).reshape(t, heads * hd)
        a = a @ w[p + "self_attn.o_proj.weight"].T
        residual = residual + a
        m = _rms(residual, w[p + "post_attention_layernorm.weight"], c["rms_norm_eps"])
        m = (torch.nn.functional.silu(m @ w[p + "mlp.gate_proj.weight"].T) * (m @ w[p + "mlp.up_proj.weight"].T))
        return m @ w[p + "mlp.down_proj.weight"].T, residual

    @torch.inference_mode()
    def drafts(self, tokens: list[int], k: int) -> list[int]:
        c, w = self.cfg, self.w
        embed = self.target.model.embed_tokens
        feats = self.features(tokens)[:-1]  # positions 0 .. n - 2
        ids, out = list(tokens[1:]), []
        for _ in range(k):
            e = embed(torch.tensor(ids))
            if self.v3:
                eps = c["rms_norm_eps"]
                normed = _rms(feats, w["layers.0.hidden_norm.weight"], eps)
                x = torch.cat([_rms(e, w["layers.0.input_layernorm.weight"], eps), normed], -1)
                x, residual = self._layer(0, x, normed if self.residual_normed else feats)
                pre = x + residual
                logits = _rms(pre[-1], w["norm.weight"], eps) @ w["lm_head.weight"].T
                tok = int(logits.argmax()) + int(w["d2t"][int(logits.argmax())])
                if self.cfg.get("norm_output"):
                    pre = _rms(pre, w["norm.weight"], eps)
            else:
                x = torch.cat([e, feats], -1) @ w["fc.weight"].T + w.get("fc.bias", 0)
                x, residual = self._layer(0, x, x)
                pre = x + residual
                tok = int(self.target.lm_head(pre[-1]).argmax())
            out.append(tok)
            ids.append(tok)
            feats = torch.cat([feats, pre[-1:]])
        return out


def _prompts(n: int, words: int = 6) -> list[list[int]]:
    return [[(13 * i + 5 * j) % 900 + 4 for j in range(words + 9 * i)] for i in range(n)]


@pytest.fixture(scope="module")
def target4(tokenizer_dir, tmp_path_factory) -> str:
    from pagedserve.model.random_model import build_random_model

    return build_random_model(str(tmp_path_factory.mktemp("eagle_target")), num_layers=4, num_heads=4,
                              num_kv_heads=2, tokenizer_dir=tokenizer_dir, seed=2)


@pytest.fixture(scope="module")
def plain4(target4) -> LLM:
    return LLM(target4, max_model_len=256, async_scheduling=False)


def _tokens(outs) -> list:
    return [[c.token_ids for c in o.outputs] for o in outs]


@pytest.mark.parametrize("target_name", ["llama", "qwen3_5"])
@pytest.mark.parametrize("version", [1, 3])
def test_drafts_are_the_heads_own(target_name, version, request, model_dirs, tmp_path):
    """Over a Llama target and a hybrid Qwen3.5 one (Gated DeltaNet layers, stepped back past
    rejected drafts; its final and per-layer hidden states feed the head as a Llama target's
    do)."""
    llama = target_name == "llama"
    target = request.getfixturevalue("target4") if llama else model_dirs["qwen3_5"]
    head = build_random_eagle_head(str(tmp_path / "head"), target, version=version, seed=version,
                                   draft_vocab_size=300 if version == 3 else None,
                                   aux_layer_ids=([0, 1, 3] if llama else [0, 1, 2]) if version == 3 else None,
                                   fc_bias=version == 1)
    ref = NaiveHead(head, target)
    llm = LLM(target, max_model_len=256, max_num_batched_tokens=16, max_num_seqs=4, block_size=8,
              speculative_config={"method": "eagle3" if version == 3 else "eagle", "model": head,
                                  "num_speculative_tokens": 3})
    calls = spy_proposals(llm)
    params = SamplingParams(temperature=0, max_tokens=20, ignore_eos=True)
    prompts = [{"prompt_token_ids": p} for p in _prompts(4, 10)]
    plain = request.getfixturevalue("plain4") if llama else LLM(target, max_model_len=256)
    want = _tokens(plain.generate(prompts, params, use_tqdm=False))
    assert _tokens(llm.generate(prompts, params, use_tqdm=False)) == want
    again = llm.generate(prompts, params, use_tqdm=False)  # prefix-cache hits: the head KV of the first run
    assert _tokens(again) == want and all(o.num_cached_tokens >= 8 for o in again)
    assert len(calls) > 20
    for toks, drafts in calls:
        assert drafts == ref.drafts(toks, len(drafts))
    assert_no_leak(llm)
    proposer = llm.llm_engine.runner.draft
    assert not proposer._held and not proposer._feats


def test_waiting_features_are_taken_in_time(target4, plain4, tmp_path):
    """disable_by_batch_size=1: while four requests run, none drafts, yet the head catches up
    once CATCH_UP_ROWS features wait; drafting resumes as the batch shrinks."""
    head = build_random_eagle_head(str(tmp_path / "head"), target4, version=3, seed=4)
    llm = LLM(target4, max_model_len=256, speculative_config={"method": "eagle3", "model": head,
                                                              "num_speculative_tokens": 2,
                                                              "disable_by_batch_size": 1})
    proposer = llm.llm_engine.runner.draft
    most = []
    inner = proposer.keep_features

    def spy(*a, **kw):
        out = inner(*a, **kw)
        most.append(max([sum(len(t) for _, t in segs) for segs in proposer._feats.values()] or [0]))
        return out

    proposer.keep_features = spy
    params = [SamplingParams(temperature=0, max_tokens=m, ignore_eos=True) for m in (90, 20, 20, 20)]
    prompts = [{"prompt_token_ids": p} for p in _prompts(4, 30)]
    assert _tokens(llm.generate(prompts, params, use_tqdm=False)) == _tokens(plain4.generate(prompts, params,
                                                                                              use_tqdm=False))
    assert max(most) <= CATCH_UP_ROWS + 64  # (a prompt's rows, then a step's, at most)
    assert llm.llm_engine.scheduler.num_draft_tokens > 0
    assert_no_leak(llm)


def test_sampled_requests_with_an_eagle_head(target4, tmp_path):
    head = build_random_eagle_head(str(tmp_path / "head"), target4, version=1, seed=5)
    llm = LLM(target4, max_model_len=256, speculative_config={"method": "eagle", "model": head,
                                                              "num_speculative_tokens": 2})
    params = SamplingParams(temperature=0.8, seed=11, max_tokens=25, ignore_eos=True)
    prompts = [{"prompt_token_ids": p} for p in _prompts(3)]
    a, b = (_tokens(llm.generate(prompts, params, use_tqdm=False)) for _ in range(2))
    assert a == b and all(len(c) == 25 for o in a for c in o)
    assert llm.llm_engine.scheduler.num_draft_tokens > 0
    assert not llm.llm_engine.runner.draft._probs
    assert_no_leak(llm)


def test_bad_heads(target4, tmp_path):
    head = build_random_eagle_head(str(tmp_path / "head"), target4, version=3)
    with open(os.path.join(head, "config.json")) as f:
        cfg = json.load(f)
    cfg["eagle_config"] = {"eagle_aux_hidden_state_layer_ids": [0, 1, 9]}
    with open(os.path.join(head, "config.json"), "w") as f:
        json.dump(cfg, f)
    with pytest.raises(ValueError, match=r"reads target layers in \[0, 4\)"):
        LLM(target4, speculative_config={"method": "eagle3", "model": head, "num_speculative_tokens": 2})
    with pytest.raises(ValueError, match="needs model"):
        LLM(target4, speculative_config={"method": "eagle", "num_speculative_tokens": 2})


def test_preemption_and_async_scheduling(target4, plain4, tmp_path):
    """A 14-block cache preempts (the head's features and KV start over with the request), with
    async scheduling: the outputs are the target's."""
    head = build_random_eagle_head(str(tmp_path / "head"), target4, version=3, seed=6)
    per_block = (4 + 1) * 2 * 8 * 2 * 16 * 4  # (target + head layers) * (k, v) * block * kv heads * dim * fp32
    llm = LLM(target4, max_model_len=256, block_size=8, kv_cache_memory_bytes=14 * per_block,
              async_scheduling=True, speculative_config={"method": "eagle3", "model": head,
                                                         "num_speculative_tokens": 3})
    params = SamplingParams(temperature=0, max_tokens=30, ignore_eos=True)
    prompts = [{"prompt_token_ids": p} for p in _prompts(6, 20)]
    assert _tokens(llm.generate(prompts, params, use_tqdm=False)) == _tokens(plain4.generate(prompts, params,
                                                                                              use_tqdm=False))
    assert llm.llm_engine.scheduler.num_preemptions > 0
    assert_no_leak(llm)
    assert not llm.llm_engine.runner.draft._feats


@pytest.mark.parametrize("variant", ["plain", "all"])
def test_speculators_format_heads(target4, plain4, tmp_path, variant):
    """A head saved by `speculators` (nested layer config, `layers.0` names, norm_before_residual
    True by default): `{"model": HEAD}` alone takes the method and the draft length from its
    config; with vLLM's variants too (norm_before_fc, fc_norm, norm_output) and two target
    layers, every proposal is the twin's."""
    variants = {"norm_before_fc": True, "fc_norm": True, "norm_output": True} if variant == "all" else None
    head = build_random_eagle_head(str(tmp_path / "head"), target4, version=3, seed=8, draft_vocab_size=400,
                                   aux_layer_ids=[1, 2] if variant == "all" else None, speculators_tokens=2,
                                   variants=variants)
    ref = NaiveHead(head, target4)
    assert ref.residual_normed  # (the speculators default)
    llm = LLM(target4, max_model_len=256, max_num_batched_tokens=16, speculative_config={"model": head})
    spec = llm.llm_engine.config.speculative_config
    assert (spec.method, spec.num_speculative_tokens) == ("eagle3", 2)
    calls = spy_proposals(llm)
    params = SamplingParams(temperature=0, max_tokens=16, ignore_eos=True)
    prompts = [{"prompt_token_ids": p} for p in _prompts(3, 10)]
    assert _tokens(llm.generate(prompts, params, use_tqdm=False)) == _tokens(plain4.generate(prompts, params,
                                                                                              use_tqdm=False))
    assert len(calls) > 10 and max(len(d) for _, d in calls) == 2
    for toks, drafts in calls:
        assert drafts == ref.drafts(toks, len(drafts))
    assert_no_leak(llm)


def test_bad_speculators_heads(target4, tmp_path):
    head = build_random_eagle_head(str(tmp_path / "head"), target4, version=3, speculators_tokens=3)
    with pytest.raises(ValueError, match="is a speculators 'eagle3' head, but method is 'eagle'"):
        LLM(target4, speculative_config={"model": head, "method": "eagle"})
    with open(os.path.join(head, "config.json")) as f:
        cfg = json.load(f)
    for change, words in (({"speculators_model_type": "medusa"}, "speculators_model_type 'medusa' is not"),
                          ({"transformer_layer_config": dict(cfg["transformer_layer_config"], model_type="qwen3")},
                           "'qwen3' layers are not supported")):
        with open(os.path.join(head, "config.json"), "w") as f:
            json.dump(dict(cfg, **change), f)
        with pytest.raises(ValueError, match=words):
            LLM(target4, speculative_config={"model": head, "num_speculative_tokens": 2})


def test_graph_passes_on_static_buffers(target4, plain4, tmp_path):
    """The head's CUDA-graph passes on their static buffers (replayed eagerly here:
    capture=False), on the Triton backend: one-token passes (drafts 2..k, tokens and features
    from the device) and catch-up passes of 1 to 1 + k tokens a request (short prompts, then
    each step's new tokens), padded to 1 + k rows. Every proposal is the twin's, and the
    outputs are plain decoding's."""
    pytest.importorskip("triton")
    head = build_random_eagle_head(str(tmp_path / "head"), target4, version=3, seed=9, draft_vocab_size=300)
    ref = NaiveHead(head, target4)
    llm = LLM(target4, attention_backend="triton", dtype="float32", block_size=8, max_num_seqs=4, max_model_len=64,
              speculative_config={"method": "eagle3", "model": head, "num_speculative_tokens": 3})
    runner = llm.llm_engine.runner
    made = runner.draft.make_graphs(lambda fn, q: runner.make_graph_runner(capture=False, model=fn, query_len=q))
    assert [g.query_len for g in made] == [4, 1]
    lens: dict[int, list] = {1: [], 4: []}
    for g in made:
        run = g.run
        g.run = lambda *a, g=g, run=run: lens[g.query_len].append(int((a[2] != -1).sum())) or run(*a)
    calls = spy_proposals(llm)
    prompts = [{"prompt_token_ids": p} for p in ([5, 9, 2], [7, 1, 4, 8], [3, 3], [11, 12, 13])]
    params = SamplingParams(temperature=0, max_tokens=8, ignore_eos=True)
    assert _tokens(llm.generate(prompts, params, use_tqdm=False)) == _tokens(plain4.generate(prompts, params,
                                                                                              use_tqdm=False))
    assert len(calls) > 10
    for toks, drafts in calls:
        assert drafts == ref.drafts(toks, len(drafts))
    assert lens[1] and max(lens[4]) > len(prompts)  # (catch-up rows of several tokens: the prompts')
    assert_no_leak(llm)
