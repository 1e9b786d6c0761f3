"""Tiny random metric models built in code: offline ``--model demo`` runs and the tests.

Their scores mean nothing (random weights); they exercise every code path of a real evaluation.
"""

from __future__ import annotations

from typing import Any

import torch

from .scorers import ClipScorer, DinoScorer

DEMO = "demo"


def tiny_clip_model(seed: int = 0) -> Any:
    """A 2-layer CLIPModel (32 px images, character tokenizer's vocabulary, 16-d projection)."""
    from transformers import CLIPConfig, CLIPModel

    from ..pipeline.tiny import tiny_tokenizer

    vocab = len(tiny_tokenizer())
    torch.manual_seed(seed)
    text = dict(vocab_size=vocab, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                max_position_embeddings=77, bos_token_id=vocab - 2, eos_token_id=vocab - 1, pad_token_id=vocab - 1)
    vision = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, image_size=32,
                  patch_size=8)
    return CLIPModel(CLIPConfig(text_config=text, vision_config=vision, projection_dim=16)).eval()


def tiny_dino_model(seed: int = 0) -> Any:
    """A 2-layer ViTModel without pooler (32 px images, 8 px patches), shaped like DINO ViT-S/16."""
    from transformers import ViTConfig, ViTModel

    torch.manual_seed(seed)
    config = ViTConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                       image_size=32, patch_size=8)
    return ViTModel(config, add_pooling_layer=False).eval()


def demo_clip_scorer(seed: int = 0) -> ClipScorer:
    """A ClipScorer over :func:`tiny_clip_model` and the character tokenizer."""
    from ..pipeline.tiny import tiny_tokenizer

    return ClipScorer(tiny_clip_model(seed), tiny_tokenizer())


def demo_dino_scorer(seed: int = 0) -> DinoScorer:
    """A DinoScorer over :func:`tiny_dino_model` (ImageNet mean/std)."""
    return DinoScorer(tiny_dino_model(seed))
