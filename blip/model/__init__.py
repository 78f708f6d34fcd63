"""The MED model: ViT + BERT-style text encoder/decoder, BLIP's losses and generation.

Modules (import from them by name; ``config`` is torch-free, so validating params is cheap)::

    config      BlipConfig, VisionConfig, TextConfig, GenerationConfig, load_preset, PRESETS, SHARING_STRATEGIES
    blip        BlipPretrain, BlipRetrieval, BlipCaptioner (MODEL_CLASSES): the paper's models and losses
    med, vit    the text transformer (Role.TEXT / ENCODER / DECODER) and the ViT
    sharing     Table 3's encoder/decoder parameter sharing
    losses      ITC, ITM and LM as pure functions
    generation  generate(): greedy, beam and nucleus decoding with a KV cache
    scoring     itm_scores, image_embeddings, text_embeddings, cosine_similarity
"""
