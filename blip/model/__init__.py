"""The MED model: ViT + BERT-style text encoder/decoder, BLIP's losses and generation."""

from .blip import MODEL_CLASSES, BlipBase, BlipCaptioner, BlipPretrain, BlipRetrieval
from .config import PRESETS, SHARING_STRATEGIES, BlipConfig, TextConfig, VisionConfig, load_preset
from .generation import GenerationConfig, generate
from .med import Role, TextDecoder, TextTransformer
from .scoring import ITMScores, cosine_similarity, image_embeddings, itm_scores, text_embeddings

__all__ = [
    "MODEL_CLASSES", "BlipBase", "BlipCaptioner", "BlipPretrain", "BlipRetrieval", "PRESETS",
    "SHARING_STRATEGIES", "BlipConfig", "TextConfig", "VisionConfig", "load_preset", "GenerationConfig",
    "generate", "Role", "TextDecoder", "TextTransformer", "ITMScores", "cosine_similarity",
    "image_embeddings", "itm_scores", "text_embeddings",
]
