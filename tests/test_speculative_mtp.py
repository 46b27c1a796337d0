"""Speculative decoding with a model's own multi-token-prediction layer (model/mtp.py and
model/qwen3_next_mtp.py, vLLM's method "mtp"): every proposal is what a plain full-recompute
twin gives, built from transformers' own decoder layer holding the MTP block's weights and the
target's hidden states; the outputs are the target's (Qwen3-Next / Qwen3.5 targets step their
Gated DeltaNet states back past rejected drafts); nothing leaks; bad configurations are
refused."""

from __future__ import annotations

import json
import os
import shutil

import pytest
import torch
from engine_helpers import assert_no_leak, spy_proposals

from pagedserve import LLM, SamplingParams
from pagedserve.model.random_model import ARCH_CONFIGS, add_random_mtp_layer, add_random_qwen_mtp


def _rms(x: torch.Tensor, w: torch.Tensor, eps: float) -> torch.Tensor:
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps) * w


def _zc_rms(x: torch.Tensor, w: torch.Tensor, eps: float) -> torch.Tensor:
    """Qwen3-Next's zero-centred norm: weight 1 + w."""
    return _rms(x, 1 + w, eps)


class MtpTwin:
    """The MTP layer recomputed over the whole sequence for every draft, with transformers'
    decoder layer (loaded from the checkpoint's MTP tensors) as its block."""

    def __init__(self, model_dir: str) -> None:
        import transformers
        from safetensors.torch import load_file

        self.target = transformers.AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
        with open(os.path.join(model_dir, "config.json")) as f:
            raw = json.load(f)
        self.n = raw["num_hidden_layers"]
        self.qwen = bool(raw.get("mtp_num_hidden_layers"))  # (Qwen3-Next's form: mtp.*)
        bigger = dict(raw, num_hidden_layers=self.n + 1)
        if raw.get("mlp_layer_types"):
            bigger["mlp_layer_types"] = raw["mlp_layer_types"] + ["sparse"]
        if self.qwen:
            bigger["layer_types"] = raw["layer_types"] + ["full_attention"]
        arch = raw["architectures"][0]
        cfg = getattr(transformers, ARCH_CONFIGS[arch][0]).from_dict(bigger)
        full = getattr(transformers, arch)(cfg).eval()
        weights = load_file(os.path.join(model_dir, "model-mtp.safetensors"))
        prefix = f"model.layers.{self.n}."
        if self.qwen:
            weights = {(prefix + k[len("mtp.layers.0."):] if k.startswith("mtp.layers.0.") else k[len("mtp."):]): v
                       for k, v in weights.items()}
        self.w = {k[len(prefix):] if k.startswith(prefix) else k: v.float() for k, v in weights.items()}
        # (the block's experts keep checkpoint names: from_pretrained converts them)
        block = {k[len(prefix):]: v for k, v in weights.items() if k.startswith(prefix)}
        tmp = os.path.join(model_dir, "_twin")
        full.save_pretrained(tmp)
        state = {k: v for k, v in load_file(os.path.join(tmp, "model.safetensors")).items()}
        shutil.rmtree(tmp)
        state.update({prefix + k: v for k, v in block.items() if not k.startswith(("enorm", "hnorm", "eh_proj",
                                                                                   "shared_head", "embed_tokens"))})
        os.makedirs(tmp)
        from safetensors.torch import save_file

        save_file(state, os.path.join(tmp, "model.safetensors"))
        cfg.save_pretrained(tmp)
        full = getattr(transformers, arch).from_pretrained(tmp, dtype=torch.float32).eval()
        shutil.rmtree(tmp)
        self.block, self.rotary = full.model.layers[self.n], full.model.rotary_emb
        self.eps = raw["rms_norm_eps"]

    @torch.inference_mode()
    def drafts(self, tokens: list[int], k: int) -> list[int]:
        w, eps = self.w, self.eps
        feats = self.target.model(torch.tensor([tokens])).last_hidden_state[0][:-1]  # positions 0 .. n - 2
        ids, out = list(tokens[1:]), []
        if self.qwen:
            return self._qwen_drafts(feats, ids, k)
        embed = w["embed_tokens.weight"] if "embed_tokens.weight" in w else self.target.model.embed_tokens.weight
        head = w["shared_head.head.weight"] if "shared_head.head.weight" in w else self.target.lm_head.weight
        for _ in range(k):
            e = embed[torch.tensor(ids)].clone()
            e[0] = 0  # position 0's input is masked
            x = torch.cat([_rms(e, w["enorm.weight"], eps), _rms(feats, w["hnorm.weight"], eps)], -1)
            x = (x @ w["eh_proj.weight"].T)[None]
            pos = torch.arange(x.shape[1])[None]
            h = self.block(x, attention_mask=None, position_ids=pos, position_embeddings=self.rotary(x, pos))
            h = (h[0] if isinstance(h, tuple) else h)[0]
            tok = int((_rms(h[-1], w["shared_head.norm.weight"], eps) @ head.T).argmax())
            out.append(tok)
            ids.append(tok)
            feats = torch.cat([feats, h[-1:]])
        return out

    def _qwen_drafts(self, feats: torch.Tensor, ids: list[int], k: int) -> list[int]:
        """Qwen3-Next's layer: no masked position, zero-centred norms, its normed output both
        the LM head's input and the next feature."""
        w, eps, out = self.w, self.eps, []
        for _ in range(k):
            e = self.target.model.embed_tokens.weight[torch.tensor(ids)]
            x = torch.cat([_zc_rms(e, w["pre_fc_norm_embedding.weight"], eps),
                           _zc_rms(feats, w["pre_fc_norm_hidden.weight"], eps)], -1)
            x = (x @ w["fc.weight"].T)[None]
            pos = torch.arange(x.shape[1])[None]
            h = self.block(x, attention_mask=None, position_ids=pos, position_embeddings=self.rotary(x, pos))
            h = _zc_rms((h[0] if isinstance(h, tuple) else h)[0], w["norm.weight"], eps)
            tok = int((h[-1] @ self.target.lm_head.weight.T).argmax())
            out.append(tok)
            ids.append(tok)
            feats = torch.cat([feats, h[-1:]])
        return out


def _prompts(n: int) -> list[list[int]]:
    return [[(13 * i + 5 * j) % 900 + 4 for j in range(6 + 9 * i)] for i in range(n)]


@pytest.fixture(scope="module", params=["glm4_moe_lite", "glm4_moe", "qwen3_5", "qwen3_next"])
def mtp_model(request, model_dirs, tmp_path_factory) -> str:
    path = str(tmp_path_factory.mktemp(f"mtp_{request.param}"))
    shutil.copytree(model_dirs[request.param], path, dirs_exist_ok=True)
    if request.param.startswith("qwen"):
        return add_random_qwen_mtp(path, seed=3)
    return add_random_mtp_layer(path, seed=3, own_head=request.param == "glm4_moe")


def _tokens(outs) -> list:
    return [[c.token_ids for c in o.outputs] for o in outs]


def test_mtp_drafts_are_the_layers_own(mtp_model):
    """GLM-4.7-Flash (latent attention, experts; the target's LM head), GLM-4.5 (its own
    head), Qwen3.5 (a dense layer over a target with Gated DeltaNet states) and Qwen3-Next
    (experts): k = 2 drafts a step through chunked catch-up, every proposal the twin's,
    outputs plain decoding's."""
    twin = MtpTwin(mtp_model)
    plain = LLM(mtp_model, max_model_len=256, async_scheduling=False)
    llm = LLM(mtp_model, max_model_len=256, max_num_batched_tokens=16, max_num_seqs=4,
              speculative_config={"method": "mtp", "num_speculative_tokens": 2})
    assert llm.llm_engine.config.speculative_config.method == "mtp"
    calls = spy_proposals(llm)
    params = SamplingParams(temperature=0, max_tokens=14, ignore_eos=True)
    prompts = [{"prompt_token_ids": p} for p in _prompts(3)]
    assert _tokens(llm.generate(prompts, params, use_tqdm=False)) == _tokens(plain.generate(prompts, params,
                                                                                             use_tqdm=False))
    assert len(calls) > 10
    for toks, drafts in calls:
        assert drafts == twin.drafts(toks, len(drafts))
    assert_no_leak(llm)


def test_bad_mtp_configs(model_dirs, tmp_path):
    with pytest.raises(ValueError, match="has none"):  # no num_nextn_predict_layers
        LLM(model_dirs["glm4_moe_lite"], max_model_len=64, speculative_config={"method": "mtp",
                                                                            "num_speculative_tokens": 1})
    with pytest.raises(ValueError, match="takes no model"):
        LLM(model_dirs["glm4_moe_lite"], max_model_len=64,
            speculative_config={"method": "deepseek_mtp", "model": "x", "num_speculative_tokens": 1})
    path = str(tmp_path / "m")
    shutil.copytree(model_dirs["glm4_moe_lite"], path)
    with open(os.path.join(path, "config.json")) as f:
        raw = json.load(f)
    with open(os.path.join(path, "config.json"), "w") as f:
        json.dump(dict(raw, num_nextn_predict_layers=1), f)
    with pytest.raises(ValueError, match="no MTP layer weights"):
        LLM(path, max_model_len=64, speculative_config={"method": "glm4_moe_mtp", "num_speculative_tokens": 1})
