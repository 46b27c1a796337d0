"""config.json "architectures" name -> model class, imported lazily."""

from __future__ import annotations

import importlib
from typing import Any, Optional

_MODELS = {
    "ApertusForCausalLM": ("pagedserve.model.llama", "ApertusForCausalLM"),
    "ArceeForCausalLM": ("pagedserve.model.llama", "ArceeForCausalLM"),
    "CohereForCausalLM": ("pagedserve.model.cohere", "CohereForCausalLM"),
    "CwmForCausalLM": ("pagedserve.model.llama", "CwmForCausalLM"),
    "Cohere2ForCausalLM": ("pagedserve.model.cohere", "Cohere2ForCausalLM"),
    "DeepseekV2ForCausalLM": ("pagedserve.model.deepseek", "DeepseekV2ForCausalLM"),
    "DeepseekV3ForCausalLM": ("pagedserve.model.deepseek", "DeepseekV3ForCausalLM"),
    "Dots1ForCausalLM": ("pagedserve.model.dots1", "Dots1ForCausalLM"),
    "DbrxForCausalLM": ("pagedserve.model.dbrx", "DbrxForCausalLM"),
    "Ernie4_5ForCausalLM": ("pagedserve.model.ernie", "Ernie4_5ForCausalLM"),
    "Exaone4ForCausalLM": ("pagedserve.model.olmo2", "Exaone4ForCausalLM"),
    "ExaoneMoeForCausalLM": ("pagedserve.model.exaone_moe", "ExaoneMoeForCausalLM"),
    "FlexOlmoForCausalLM": ("pagedserve.model.flex_olmo", "FlexOlmoForCausalLM"),
    "Ernie4_5_MoeForCausalLM": ("pagedserve.model.ernie", "Ernie4_5_MoeForCausalLM"),
    "BloomForCausalLM": ("pagedserve.model.bloom", "BloomForCausalLM"),
    "FalconForCausalLM": ("pagedserve.model.falcon", "FalconForCausalLM"),
    "MptForCausalLM": ("pagedserve.model.mpt", "MptForCausalLM"),
    "Jais2ForCausalLM": ("pagedserve.model.jais2", "Jais2ForCausalLM"),
    "GPT2LMHeadModel": ("pagedserve.model.gpt2", "GPT2LMHeadModel"),
    "GPTBigCodeForCausalLM": ("pagedserve.model.gpt_bigcode", "GPTBigCodeForCausalLM"),
    "GPTJForCausalLM": ("pagedserve.model.gptj", "GPTJForCausalLM"),
    "GPTNeoXForCausalLM": ("pagedserve.model.gpt_neox", "GPTNeoXForCausalLM"),
    "PersimmonForCausalLM": ("pagedserve.model.persimmon", "PersimmonForCausalLM"),
    "GemmaForCausalLM": ("pagedserve.model.gemma", "GemmaForCausalLM"),
    "Gemma2ForCausalLM": ("pagedserve.model.gemma", "Gemma2ForCausalLM"),
    "Gemma3ForCausalLM": ("pagedserve.model.gemma", "Gemma3ForCausalLM"),
    "Gemma4ForCausalLM": ("pagedserve.model.gemma4", "Gemma4ForCausalLM"),
    "Gemma3nForCausalLM": ("pagedserve.model.gemma3n", "Gemma3nForCausalLM"),
    "GlmForCausalLM": ("pagedserve.model.glm4", "GlmForCausalLM"),
    "Glm4ForCausalLM": ("pagedserve.model.glm4", "Glm4ForCausalLM"),
    "HeliumForCausalLM": ("pagedserve.model.helium", "HeliumForCausalLM"),
    "Glm4MoeForCausalLM": ("pagedserve.model.glm4_moe", "Glm4MoeForCausalLM"),
    "Glm4MoeLiteForCausalLM": ("pagedserve.model.deepseek", "Glm4MoeLiteForCausalLM"),
    "LlamaForCausalLM": ("pagedserve.model.llama", "LlamaForCausalLM"),
    "MistralForCausalLM": ("pagedserve.model.llama", "MistralForCausalLM"),
    "Ministral3ForCausalLM": ("pagedserve.model.llama", "Ministral3ForCausalLM"),
    "MinistralForCausalLM": ("pagedserve.model.llama", "MinistralForCausalLM"),
    "MixtralForCausalLM": ("pagedserve.model.mixtral", "MixtralForCausalLM"),
    "GptOssForCausalLM": ("pagedserve.model.gpt_oss", "GptOssForCausalLM"),
    "GraniteForCausalLM": ("pagedserve.model.granite", "GraniteForCausalLM"),
    "GraniteMoeForCausalLM": ("pagedserve.model.granite_moe", "GraniteMoeForCausalLM"),
    "GraniteMoeSharedForCausalLM": ("pagedserve.model.granite_moe", "GraniteMoeSharedForCausalLM"),
    "GraniteMoeHybridForCausalLM": ("pagedserve.model.granite_hybrid", "GraniteMoeHybridForCausalLM"),
    "NemotronForCausalLM": ("pagedserve.model.nemotron", "NemotronForCausalLM"),
    "NemotronHForCausalLM": ("pagedserve.model.nemotron_h", "NemotronHForCausalLM"),
    "Mamba2ForCausalLM": ("pagedserve.model.nemotron_h", "Mamba2ForCausalLM"),
    "MambaForCausalLM": ("pagedserve.model.mamba", "MambaForCausalLM"),
    "FalconMambaForCausalLM": ("pagedserve.model.mamba", "FalconMambaForCausalLM"),
    "JambaForCausalLM": ("pagedserve.model.mamba", "JambaForCausalLM"),
    "BambaForCausalLM": ("pagedserve.model.granite_hybrid", "BambaForCausalLM"),
    "FalconH1ForCausalLM": ("pagedserve.model.falcon_h1", "FalconH1ForCausalLM"),
    "Lfm2ForCausalLM": ("pagedserve.model.lfm2", "Lfm2ForCausalLM"),
    "Lfm2MoeForCausalLM": ("pagedserve.model.lfm2_moe", "Lfm2MoeForCausalLM"),
    "MiniMaxForCausalLM": ("pagedserve.model.minimax", "MiniMaxForCausalLM"),
    "MiniMaxM2ForCausalLM": ("pagedserve.model.minimax_m2", "MiniMaxM2ForCausalLM"),
    "MiMoV2FlashForCausalLM": ("pagedserve.model.mimo_v2_flash", "MiMoV2FlashForCausalLM"),
    "HunYuanDenseV1ForCausalLM": ("pagedserve.model.llama", "HunYuanDenseV1ForCausalLM"),
    "HunYuanMoEV1ForCausalLM": ("pagedserve.model.hunyuan_moe", "HunYuanMoEV1ForCausalLM"),
    "OlmoForCausalLM": ("pagedserve.model.olmo", "OlmoForCausalLM"),
    "Olmo2ForCausalLM": ("pagedserve.model.olmo2", "Olmo2ForCausalLM"),
    "Olmo3ForCausalLM": ("pagedserve.model.olmo2", "Olmo3ForCausalLM"),
    "OPTForCausalLM": ("pagedserve.model.opt", "OPTForCausalLM"),
    "OlmoeForCausalLM": ("pagedserve.model.olmoe", "OlmoeForCausalLM"),
    "Llama4ForCausalLM": ("pagedserve.model.llama4", "Llama4ForCausalLM"),
    "PhiForCausalLM": ("pagedserve.model.phi", "PhiForCausalLM"),
    "Phi3ForCausalLM": ("pagedserve.model.llama", "Phi3ForCausalLM"),
    "SmolLM3ForCausalLM": ("pagedserve.model.llama", "SmolLM3ForCausalLM"),
    "SolarOpenForCausalLM": ("pagedserve.model.glm4_moe", "SolarOpenForCausalLM"),
    "PhimoeForCausalLM": ("pagedserve.model.phimoe", "PhimoeForCausalLM"),
    "Qwen3NextForCausalLM": ("pagedserve.model.qwen3_next", "Qwen3NextForCausalLM"),
    "Qwen3_5ForCausalLM": ("pagedserve.model.qwen3_next", "Qwen3_5ForCausalLM"),
    "Qwen3_5MoeForCausalLM": ("pagedserve.model.qwen3_next", "Qwen3_5MoeForCausalLM"),
    "StableLmForCausalLM": ("pagedserve.model.stablelm", "StableLmForCausalLM"),
    "Starcoder2ForCausalLM": ("pagedserve.model.starcoder2", "Starcoder2ForCausalLM"),
    "SeedOssForCausalLM": ("pagedserve.model.llama", "SeedOssForCausalLM"),
    "Qwen2ForCausalLM": ("pagedserve.model.qwen2", "Qwen2ForCausalLM"),
    "Qwen2MoeForCausalLM": ("pagedserve.model.qwen_moe", "Qwen2MoeForCausalLM"),
    "Qwen3ForCausalLM": ("pagedserve.model.qwen3", "Qwen3ForCausalLM"),
    "Qwen3MoeForCausalLM": ("pagedserve.model.qwen_moe", "Qwen3MoeForCausalLM"),
    "ZambaForCausalLM": ("pagedserve.model.zamba", "ZambaForCausalLM"),
    "Zamba2ForCausalLM": ("pagedserve.model.zamba2", "Zamba2ForCausalLM"),
}


# Base-model checkpoints (no LM head; embedding models such as Qwen3-Embedding or
# e5-mistral): the causal-LM class, run as a pooling model.
_BASE_MODELS = {
    "LlamaModel": "LlamaForCausalLM",
    "MistralModel": "MistralForCausalLM",
    "Qwen2Model": "Qwen2ForCausalLM",
    "Qwen3Model": "Qwen3ForCausalLM",
    "GemmaModel": "GemmaForCausalLM",
    "Gemma2Model": "Gemma2ForCausalLM",
    "Gemma3TextModel": "Gemma3ForCausalLM",  # (EmbeddingGemma: bidirectional, model/gemma.py)
}


# Vision-language checkpoints served as text models: the language model's class, the
# checkpoint's name pieces for it, and the pieces not loaded (vision tower, projector).
_TEXT_OF_MULTIMODAL = {
    # Llama 4 (Scout, Maverick): its images run through multimodal/llama4.py.
    "Llama4ForConditionalGeneration": ("Llama4ForCausalLM",
                                       [("language_model.model.", "model."), ("language_model.lm_head.", "lm_head."),
                                        ("model.language_model.", "model.")],
                                       ("vision_model.", "multi_modal_projector.", "model.vision_model.",
                                        "model.multi_modal_projector.")),
    "Gemma3ForConditionalGeneration": ("Gemma3ForCausalLM",
                                       [("language_model.model.", "model."), ("language_model.lm_head.", "lm_head."),
                                        ("model.language_model.", "model.")],
                                       ("vision_tower.", "multi_modal_projector.", "model.vision_tower.",
                                        "model.multi_modal_projector.")),
    # Gemma 4: the language model alone (its image, video and audio towers are not loaded).
    "Gemma4ForConditionalGeneration": ("Gemma4ForCausalLM", [("model.language_model.", "model.")],
                                       ("model.vision_tower.", "model.embed_vision.", "model.audio_tower.",
                                        "model.embed_audio.")),
    # Gemma 3n: the language model and its marker tokens' own embeddings (text_model_config), not
    # the towers nor the soft-token norms of their outputs.
    "Gemma3nForConditionalGeneration": ("Gemma3nForCausalLM", [("model.language_model.", "model.")],
                                        ("model.vision_tower.", "model.audio_tower.",
                                         "model.embed_vision.soft_embedding_norm.",
                                         "model.embed_audio.soft_embedding_norm.")),
    # LLaVA-1.5 and its kin: a Llama / Mistral / Qwen2 decoder (by text_config.model_type); its
    # images run through multimodal/llava.py.
    "LlavaForConditionalGeneration": (None, [("language_model.model.", "model."), ("language_model.lm_head.", "lm_head."),
                                             ("model.language_model.", "model.")],
                                      ("vision_tower.", "multi_modal_projector.", "model.vision_tower.",
                                       "model.multi_modal_projector.")),
    # LLaVA-NeXT (LLaVA-1.6): the same, plus the learned row-end vector; multimodal/llava_next.py.
    "LlavaNextForConditionalGeneration": (None, [("language_model.model.", "model."),
                                                 ("language_model.lm_head.", "lm_head."),
                                                 ("model.language_model.", "model.")],
                                          ("vision_tower.", "multi_modal_projector.", "image_newline",
                                           "model.vision_tower.", "model.multi_modal_projector.",
                                           "model.image_newline")),
    # InternVL3 / InternVL3.5 "-hf": an InternViT tower on a Qwen2 / Qwen3 / Llama decoder (by
    # text_config.model_type), LLaVA's checkpoint names; its images run through multimodal/internvl.py.
    "InternVLForConditionalGeneration": (None, [("language_model.model.", "model."),
                                                ("language_model.lm_head.", "lm_head."),
                                                ("model.language_model.", "model.")],
                                         ("vision_tower.", "multi_modal_projector.", "model.vision_tower.",
                                          "model.multi_modal_projector.")),
    # Mistral 3 (Mistral Small 3.1 / 3.2): a Pixtral tower on a Mistral decoder (by
    # text_config.model_type); its images run through multimodal/mistral3.py.
    "Mistral3ForConditionalGeneration": (None, [("language_model.model.", "model."),
                                                ("language_model.lm_head.", "lm_head."),
                                                ("model.language_model.", "model.")],
                                         ("vision_tower.", "multi_modal_projector.", "model.vision_tower.",
                                          "model.multi_modal_projector.")),
    # Qwen2-VL, Qwen2.5-VL: the Qwen2 decoder with M-RoPE (model/layers/rotary.py); images
    # through multimodal/qwen2_vl.py. Hub checkpoints keep the decoder under "model." already.
    "Qwen2VLForConditionalGeneration": ("Qwen2ForCausalLM", [("model.language_model.", "model.")],
                                        ("visual.", "model.visual.")),
    "Qwen2_5_VLForConditionalGeneration": ("Qwen2ForCausalLM", [("model.language_model.", "model.")],
                                           ("visual.", "model.visual.")),
    # Qwen3-VL: the Qwen3 decoder with interleaved M-RoPE, and DeepStack (vision features added
    # into the first decoder layers' outputs).
    "Qwen3VLForConditionalGeneration": ("Qwen3ForCausalLM", [("model.language_model.", "model.")],
                                        ("visual.", "model.visual.")),
    "Qwen3VLMoeForConditionalGeneration": ("Qwen3MoeForCausalLM", [("model.language_model.", "model.")],
                                           ("visual.", "model.visual.")),
    # Qwen3.5 (all its releases are vision-language checkpoints): the hybrid decoder with
    # interleaved M-RoPE; images through multimodal/qwen2_vl.py.
    "Qwen3_5ForConditionalGeneration": ("Qwen3_5ForCausalLM", [("model.language_model.", "model.")],
                                        ("visual.", "model.visual.")),
    "Qwen3_5MoeForConditionalGeneration": ("Qwen3_5MoeForCausalLM", [("model.language_model.", "model.")],
                                           ("visual.", "model.visual.")),
}
# LLaVA-OneVision: LLaVA-NeXT's checkpoint names, on a Qwen2 decoder; multimodal/llava_onevision.py.
_TEXT_OF_MULTIMODAL["LlavaOnevisionForConditionalGeneration"] = _TEXT_OF_MULTIMODAL["LlavaNextForConditionalGeneration"]
_TEXT_BY_MODEL_TYPE = {"llama": "LlamaForCausalLM", "mistral": "MistralForCausalLM", "qwen2": "Qwen2ForCausalLM",
                       "qwen3": "Qwen3ForCausalLM", "ministral3": "Ministral3ForCausalLM"}


def text_model_config(hf_config: Any) -> Any:
    """A vision-language model's language-model config (its `text_config`, named as the text
    architecture), else the config unchanged."""
    archs = list(getattr(hf_config, "architectures", None) or [])
    if archs and archs[0] in _TEXT_OF_MULTIMODAL:
        text = getattr(hf_config, "text_config", None) or hf_config  # flat in older Qwen2-VL configs
        arch = _TEXT_OF_MULTIMODAL[archs[0]][0] or _TEXT_BY_MODEL_TYPE.get(text.model_type)
        if arch is None:
            raise ValueError(f"{archs[0]} with a {text.model_type!r} language model is not supported; "
                             f"supported: {', '.join(_TEXT_BY_MODEL_TYPE)}.")
        text.architectures = [arch]
        for name in ("dtype", "torch_dtype"):  # a text_config without its own dtype has the checkpoint's
            top = getattr(hf_config, name, None)
            if top is not None and getattr(text, name, None) is None:
                setattr(text, name, top)
                break
        # The LM head belongs to the whole model: transformers ties it by the top config's flag,
        # whatever the text config says (Qwen3-VL-MoE's differ; Qwen2-VL's text config has none).
        tie = getattr(hf_config, "tie_word_embeddings", None)
        if text is not hf_config and tie is not None:
            text.tie_word_embeddings = bool(tie)
        text.multimodal_architecture = archs[0]
        # The placeholder tokens of images, videos and audio (Gemma 4's per-layer embeddings take
        # the pad token's there, as transformers does).
        text.multimodal_token_ids = [int(t) for t in (getattr(hf_config, f"{kind}_token_id", None)
                                                      for kind in ("image", "video", "audio")) if t is not None]
        # Gemma 3n's image and audio marker ids past the text vocabulary: embedded by tables of their
        # own, (offset, size, width, eps) each.
        hard = {kind: (int(c.vocab_offset), int(c.vocab_size), int(c.hidden_size), float(c.rms_norm_eps))
                for kind, c in ((k, getattr(hf_config, f"{k}_config", None)) for k in ("vision", "audio"))
                if archs[0] == "Gemma3nForConditionalGeneration" and c is not None}
        if hard:
            text.hard_token_embeddings = hard
        return text
    return hf_config


def non_text_prefixes(architecture: str) -> tuple[str, ...]:
    """The checkpoint name prefixes of a vision-language model's vision tower and projector."""
    return _TEXT_OF_MULTIMODAL[architecture][2]


def checkpoint_names(hf_config: Any) -> tuple[list[tuple[str, str]], tuple[str, ...]]:
    """(renamed pieces, skipped prefixes) of the checkpoint a text config was taken from."""
    entry = _TEXT_OF_MULTIMODAL.get(getattr(hf_config, "multimodal_architecture", None) or "")
    return (entry[1], entry[2]) if entry else ([], ())


# Sequence classifiers (reward models, cross-encoders): the causal-LM class with a linear
# `score` head on the last token's hidden state instead of the LM head.
_CLASSIFIERS = {
    "LlamaForSequenceClassification": "LlamaForCausalLM",
    "MistralForSequenceClassification": "MistralForCausalLM",
    "Qwen2ForSequenceClassification": "Qwen2ForCausalLM",
    "Qwen3ForSequenceClassification": "Qwen3ForCausalLM",
    "GemmaForSequenceClassification": "GemmaForCausalLM",
    "Gemma2ForSequenceClassification": "Gemma2ForCausalLM",
}


def is_encoder_only(hf_config: Any) -> bool:
    """BERT-family encoders (model/bert.py) and decoders made bidirectional (EmbeddingGemma):
    pooling only, each prompt whole in one step."""
    from pagedserve.model.bert import ENCODER_ARCHITECTURES, is_bidirectional_decoder

    archs = list(getattr(hf_config, "architectures", None) or [])
    return bool(archs) and (archs[0] in ENCODER_ARCHITECTURES or is_bidirectional_decoder(hf_config))


def is_base_model(hf_config: Any) -> bool:
    archs = list(getattr(hf_config, "architectures", None) or [])
    return bool(archs) and all(a in _BASE_MODELS for a in archs)


def pooling_task(hf_config: Any) -> Optional[str]:
    """"embed" for base-model checkpoints, "classify" for sequence classifiers, else None
    (a generative model, which may still be run as an embedding model)."""
    archs = list(getattr(hf_config, "architectures", None) or [])
    if is_encoder_only(hf_config):
        return "classify" if archs[0].endswith("ForSequenceClassification") else "embed"
    if archs and all(a in _CLASSIFIERS for a in archs):
        return "classify"
    return "embed" if is_base_model(hf_config) else None


def supported_architectures() -> list[str]:
    from pagedserve.model.bert import ENCODER_ARCHITECTURES

    return sorted([*_MODELS, *_BASE_MODELS, *_CLASSIFIERS, *_TEXT_OF_MULTIMODAL, *ENCODER_ARCHITECTURES])


def resolve_model_class(hf_config: Any) -> type:
    archs = list(getattr(hf_config, "architectures", None) or [])
    from pagedserve.model.bert import ENCODER_ARCHITECTURES, encoder_class

    if archs and archs[0] in ENCODER_ARCHITECTURES:
        return encoder_class(hf_config)
    for arch in archs:
        arch = _BASE_MODELS.get(arch) or _CLASSIFIERS.get(arch) or arch
        if arch in _MODELS:
            module, cls = _MODELS[arch]
            return getattr(importlib.import_module(module), cls)
    raise ValueError(
        f"model architecture {archs or '(none in config.json)'} is not supported; "
        f"supported architectures: {', '.join(supported_architectures())}."
    )
