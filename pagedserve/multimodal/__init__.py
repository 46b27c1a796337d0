"""Image inputs for vision-language models (LLaVA, Qwen-VL, Gemma 3, Mistral 3): loading
images, the model's image processor, placeholder expansion, and the vision encoders whose
outputs replace the placeholder tokens' embeddings."""

from pagedserve.multimodal.inputs import ImageFeature, load_image

__all__ = ["ImageFeature", "load_image"]
