"""Sequence classifiers (reward models, cross-encoders): LLM.classify's probabilities equal
transformers' *ForSequenceClassification logits (last token) through softmax / sigmoid."""

from __future__ import annotations

import pytest
import torch

from pagedserve import LLM, PoolingParams
from pagedserve.errors import ParamError


def _build(tokenizer_dir: str, path: str, arch: str, num_labels: int) -> str:
    import transformers
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tokenizer_dir)
    cfg_cls = {"LlamaForSequenceClassification": "LlamaConfig", "Qwen3ForSequenceClassification": "Qwen3Config",
               "Gemma2ForSequenceClassification": "Gemma2Config"}[arch]
    cfg = getattr(transformers, cfg_cls)(hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                         num_attention_heads=4, num_key_value_heads=2, head_dim=16,
                                         vocab_size=len(tok), num_labels=num_labels, pad_token_id=tok.pad_token_id,
                                         initializer_range=0.3)
    cfg.architectures = [arch]
    torch.manual_seed(1)
    getattr(transformers, arch)(cfg).save_pretrained(path)
    tok.save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def classifiers(tokenizer_dir, tmp_path_factory):
    return {(arch, n): _build(tokenizer_dir, str(tmp_path_factory.mktemp("cls")), arch, n)
            for arch, n in (("LlamaForSequenceClassification", 3), ("Qwen3ForSequenceClassification", 1),
                            ("Gemma2ForSequenceClassification", 2))}


@pytest.mark.parametrize("arch, num_labels", [("LlamaForSequenceClassification", 3),
                                              ("Qwen3ForSequenceClassification", 1),
                                              ("Gemma2ForSequenceClassification", 2)])
def test_probs_match_transformers(classifiers, arch, num_labels):
    from transformers import AutoModelForSequenceClassification

    path = classifiers[(arch, num_labels)]
    llm = LLM(path, max_num_batched_tokens=32, block_size=8)
    assert llm.llm_engine.config.pooling_task == "classify"
    hf = AutoModelForSequenceClassification.from_pretrained(path, dtype=torch.float32).eval()
    prompts = [[(19 * i + 7 * j) % 1000 + 4 for j in range(n)] for i, n in enumerate((4, 45, 100))]
    outs = llm.classify([{"prompt_token_ids": p} for p in prompts], use_tqdm=False)
    for p, o in zip(prompts, outs):
        with torch.inference_mode():
            logits = hf(torch.tensor([p])).logits[0].double()
        want = torch.sigmoid(logits) if num_labels == 1 else torch.softmax(logits, -1)
        assert o.outputs.num_classes == num_labels
        torch.testing.assert_close(torch.tensor(o.outputs.probs, dtype=torch.float64), want, rtol=1e-4, atol=1e-6)
    assert len({tuple(o.outputs.probs) for o in outs}) == 3  # prompts score differently
    with pytest.raises(ParamError, match="does not embed"):
        llm.embed("hello", use_tqdm=False)
    with pytest.raises(ParamError, match="sequence classifier .*does not generate text"):
        llm.generate("hello", use_tqdm=False)
    with pytest.raises(ParamError, match="dimensions"):
        llm.llm_engine.add_request(None, "hello", PoolingParams(dimensions=4))
    with pytest.raises(ValueError, match="no LM head"):
        LLM(path, runner="generate")


def test_classify_on_an_embedding_model_is_an_error(base_dir):
    with pytest.raises(ParamError, match="does not classify"):
        LLM(base_dir).classify("hello", use_tqdm=False)
