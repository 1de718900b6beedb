"""The init of a model trained from scratch (the tiny repro models; a real run starts from pretrained weights)."""
import torch
import torch.nn as nn

from nanovoco.model import RMSNorm


def init_weights(module: nn.Module):
    """N(0, 0.02) weights and zero biases for every Linear, Embedding and Conv2d, as GPT and ViT do, norms to the
    identity (weight 1, bias 0); a CLIP tower also gets a N(0, 0.02) class embedding and fixed 2D sine-cosine
    positions (see sincos_2d). Every parameter is written, so it also initialises a model materialised from the meta
    device with to_empty (nanovoco.bench's 7B model), whose memory holds garbage."""
    for m in module.modules():
        if isinstance(m, (nn.Linear, nn.Embedding, nn.Conv2d)):
            nn.init.normal_(m.weight, std=0.02)
            if getattr(m, "bias", None) is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, (RMSNorm, nn.LayerNorm)):
            nn.init.ones_(m.weight)
            if getattr(m, "bias", None) is not None:
                nn.init.zeros_(m.bias)
    for m in module.modules():
        if hasattr(m, "class_embedding"):  # CLIP's learned embeddings are bare parameters
            nn.init.normal_(m.class_embedding, std=0.02)
            with torch.no_grad():
                m.position_embedding.copy_(sincos_2d(m.config))


def sincos_2d(c) -> torch.Tensor:
    """(1 + patches, dim) fixed 2D sine-cosine position embeddings (MAE's), CLS row zero: the init of a vision tower
    trained from scratch. With N(0, 0.02) the position of a patch is lost next to its content, and a LLaMA decoder
    cannot recover it (RoPE puts positions into attention scores, never into values), so "is the red object on the
    left?" would be unanswerable."""
    side, quarter = c.image_size // c.patch_size, c.hidden_size // 4
    omega = 1.0 / 10000 ** (torch.arange(quarter) / quarter)
    ys, xs = torch.meshgrid(torch.arange(side), torch.arange(side), indexing="ij")
    parts = [f(coord.flatten()[:, None] * omega) for coord in (xs, ys) for f in (torch.sin, torch.cos)]
    grid = torch.cat(parts, dim=1)  # (side * side, 4 * quarter)
    out = torch.zeros(1 + side * side, c.hidden_size)
    out[1:, :grid.shape[1]] = grid
    return out
