"""The paper's external-compressor baselines (Table 1): modules that shrink the N vision tokens to K tokens *before*
the LLM, in contrast with VoCo-LLaMA, where the LLM compresses them itself.

- `AvgPoolCompressor`: average pooling + a linear layer, as LLaMA-VID makes its content token (the mean of the
  vision encoder's tokens, then a linear map).
- `QFormerCompressor`: K learned queries that cross-attend to the vision tokens, a small BLIP-2 Q-Former.
Both map the vision tower's features (n_images, N, D_vision) -> (n_images, K, D_vision), which the VLM's projector
then maps into the LLM's embedding space: as in LLaMA-VID and BLIP-2, they read the frozen encoder's output, not
the output of a projector trained with them (a trainable MLP before the average would learn codes that survive it).
"""
import torch
import torch.nn as nn
import torch.nn.functional as F
from einops import rearrange


class AvgPoolCompressor(nn.Module):
    def __init__(self, dim: int, num_tokens: int):
        super().__init__()
        self.num_tokens = num_tokens
        self.linear = nn.Linear(dim, dim)
        # start as a pure average of tokens the LLM already understands; training then adapts the linear map
        nn.init.eye_(self.linear.weight)
        nn.init.zeros_(self.linear.bias)

    def forward(self, x):  # (B, N, D) -> (B, K, D): K contiguous windows of the patch sequence, averaged
        x = F.adaptive_avg_pool1d(rearrange(x, "b n d -> b d n"), self.num_tokens)
        return self.linear(rearrange(x, "b d k -> b k d"))


class QFormerLayer(nn.Module):
    def __init__(self, dim: int, n_heads: int):
        super().__init__()
        self.n_heads = n_heads
        self.norm_q, self.norm_kv, self.norm_mlp = nn.LayerNorm(dim), nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.q_proj, self.k_proj, self.v_proj, self.o_proj = (nn.Linear(dim, dim) for _ in range(4))
        self.fc1, self.fc2 = nn.Linear(dim, 4 * dim), nn.Linear(4 * dim, dim)

    def forward(self, queries, vision):  # (B, K, D), (B, N, D)
        q, kv = self.norm_q(queries), self.norm_kv(vision)
        q = rearrange(self.q_proj(q), "b k (h d) -> b h k d", h=self.n_heads)
        k = rearrange(self.k_proj(kv), "b n (h d) -> b h n d", h=self.n_heads)
        v = rearrange(self.v_proj(kv), "b n (h d) -> b h n d", h=self.n_heads)
        y = F.scaled_dot_product_attention(q, k, v)  # every query reads every vision token
        queries = queries + self.o_proj(rearrange(y, "b h k d -> b k (h d)"))
        return queries + self.fc2(F.gelu(self.fc1(self.norm_mlp(queries))))


class QFormerCompressor(nn.Module):
    def __init__(self, dim: int, num_tokens: int, n_layers: int = 2, n_heads: int = 4):
        super().__init__()
        self.queries = nn.Parameter(torch.randn(num_tokens, dim) * 0.02)
        self.layers = nn.ModuleList(QFormerLayer(dim, n_heads) for _ in range(n_layers))
        self.norm = nn.LayerNorm(dim)

    def forward(self, x):  # (B, N, D) -> (B, K, D)
        q = self.queries.expand(x.shape[0], -1, -1)
        for layer in self.layers:
            q = layer(q, x)
        return self.norm(q)


COMPRESSORS = {"avgpool": AvgPoolCompressor, "qformer": QFormerCompressor}
