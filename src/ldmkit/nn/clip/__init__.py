"""open_clip models for ldmkit: factory, tokenizer, contrastive losses, frozen text encoder, retrieval metrics.

Pure torch (no Lightning/Hydra). ``open_clip`` is imported lazily: it pulls in torchvision and
more (~10 s), and the losses/metrics here are used by processes that never build a model.

``factory`` builds networks and loads local pretrained weights, ``tokenizer`` wraps open_clip's BPE,
``losses`` holds CLIP/SigLIP, ``text_encoder`` the frozen tower the diffusion stage conditions on,
``loading`` reads trained models back, ``metrics`` scores retrieval and zero-shot accuracy. The names
below are the package's public face (configs target ``ldmkit.nn.clip.build_clip``, ``.ClipLoss``, ...).
"""

from ldmkit.nn.clip.factory import (
    CHECKPOINT_SUFFIXES,
    CLIP_MEAN,
    CLIP_STD,
    PRODUCER,
    ClipCheckpointError,
    build_clip,
    clip_arch,
    describe_mismatch,
    encode_images,
    encode_texts,
    load_pretrained,
    preprocess_images,
    resolve_clip_config,
)
from ldmkit.nn.clip.loading import artifact_config, freeze, load_clip, load_text_encoder
from ldmkit.nn.clip.losses import ClipLoss, SigLipLoss, gather_with_grad
from ldmkit.nn.clip.metrics import ZeroShotTask, caption_ids, retrieval_recall, zero_shot_accuracy
from ldmkit.nn.clip.text_encoder import FrozenClipTextEncoder
from ldmkit.nn.clip.tokenizer import PaddedTokenizer, TextNoise, build_tokenizer, insert_random_tokens

__all__ = [
    "CHECKPOINT_SUFFIXES", "CLIP_MEAN", "CLIP_STD", "PRODUCER", "ClipCheckpointError", "ClipLoss",
    "FrozenClipTextEncoder", "PaddedTokenizer", "SigLipLoss", "TextNoise", "ZeroShotTask", "artifact_config", "build_clip",
    "build_tokenizer", "caption_ids", "clip_arch", "describe_mismatch", "encode_images", "encode_texts", "freeze",
    "gather_with_grad", "insert_random_tokens", "load_clip", "load_pretrained", "load_text_encoder", "preprocess_images",
    "resolve_clip_config", "retrieval_recall", "zero_shot_accuracy",
]
