"""Image inputs for vision-language models (LLaVA): loading images, the model's image
processor, placeholder expansion, and the vision encoder whose outputs replace the
placeholder tokens' embeddings."""

from pagedserve.multimodal.inputs import ImageFeature, load_image

__all__ = ["ImageFeature", "load_image"]
