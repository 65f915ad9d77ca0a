"""Drop-in AudioMAE and MAE-AST models whose slow parts run as fused kernels."""
from .backends import BACKENDS, BackendUnavailableError, available_backends, backend_status
from .cuda_graph import capture_train_step
from .checkpoint import CheckpointMismatchError, from_pretrained, load_pretrained_encoder
from .mae import (MaskedAutoencoderViT, mae_vit_base_patch16, mae_vit_huge_patch14, mae_vit_large_patch16,
                  mae_vit_small_patch16)
from .mae_ast import MAEAST, MAEASTClassifier, MAEASTOutput, mae_ast_frame, mae_ast_patch
from .vit import VisionTransformer, vit_base_patch16, vit_huge_patch14, vit_large_patch16, vit_small_patch16

__version__ = "0.1.0"

__all__ = [
    "BACKENDS",
    "BackendUnavailableError",
    "CheckpointMismatchError",
    "MAEAST",
    "MAEASTClassifier",
    "MAEASTOutput",
    "MaskedAutoencoderViT",
    "VisionTransformer",
    "available_backends",
    "backend_status",
    "capture_train_step",
    "from_pretrained",
    "load_pretrained_encoder",
    "mae_ast_frame",
    "mae_ast_patch",
    "mae_vit_base_patch16",
    "mae_vit_huge_patch14",
    "mae_vit_large_patch16",
    "mae_vit_small_patch16",
    "vit_base_patch16",
    "vit_huge_patch14",
    "vit_large_patch16",
    "vit_small_patch16",
]
