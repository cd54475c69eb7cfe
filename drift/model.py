"""DriftDiT: the one-step generator of "Generative Modeling via Drifting" (arXiv 2602.04770).

x = f(noise, class, alpha, style) in a single forward pass. The backbone is a LightningDiT-style
transformer with the official details (paper App. A.2 and the official `models/generator.py`):

* Linear patch embedding of flattened p x p patches plus a learnable absolute position embedding
  initialized with 2-D sin-cos.
* Conditioning vector cond = ClassEmbed(c) + sum_{i<32} StyleEmbed_i(s_i) + 0.02 * RMSNorm(MLP(sinusoid_256(alpha))):
  32 random style indices, each into its *own* 64-entry codebook; alpha (the CFG strength) goes through
  the DiT timestep embedder. There is no timestep, no label dropout and no null class.
* 16 in-context tokens (Linear(cond) copied 16 times + a learned `cls_embed`) prepended to the patch
  tokens and dropped before unpatchify.
* Blocks: RMSNorm pre-norms, attention with qkv bias, QK-norm (RMSNorm per head), 1-D RoPE over all
  token indices (prefix included, base 10000), `scaled_dot_product_attention`; SwiGLU MLP with biases;
  adaLN-zero modulation computed in fp32.
* Final layer: RMSNorm -> adaLN modulate -> zero-initialized Linear to p*p*C_out.

Build on the meta device and materialize with `to_empty` + `initialize_weights()` (all init lives there):

    with torch.device("meta"):
        model = DRIFT_MODELS["DriftDiT-B/2"](num_classes=1000)
    model.to_empty(device="cuda"); model.initialize_weights()

Presets: the paper's B/2, L/2 (32x32x4 SD-VAE latents), B/16, L/16 (256x256x3 pixels) and small ones for
28-32 px data (default 28x28x1, Fashion-MNIST). `input_size`, `in_channels`, `num_classes` and every other
constructor argument can be overridden per preset.
"""
from __future__ import annotations

import math
from typing import Callable, Dict, Optional

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

NUM_STYLE_TOKENS = 32  # official: 32 style indices per sample
STYLE_CODEBOOK_SIZE = 64  # each index selects one of 64 learned embeddings of its own codebook
NUM_PREFIX_TOKENS = 16  # in-context ("register") tokens, following JiT
ALPHA_FREQ_DIM = 256  # sinusoid width of the alpha embedder (DiT timestep embedder)
ALPHA_EMBED_SCALE = 0.02  # official: the alpha embedding enters the conditioning scaled by 0.02
ROPE_BASE = 10000.0
NORM_EPS = 1e-6


def _round_up(x: float, multiple: int) -> int:
    return int(math.ceil(x / multiple)) * multiple


def swiglu_hidden_dim(hidden_size: int) -> int:
    """SwiGLU width that matches a 4x MLP in parameters, rounded up to 32 (2048 for 768, 2752 for 1024)."""
    return _round_up(2.0 / 3.0 * 4 * hidden_size, 32)


#################################################################################
#                               Building blocks                                 #
#################################################################################


class RMSNorm(nn.Module):
    """RMSNorm with a learnable scale; statistics and scaling in fp32, output in the input dtype."""

    def __init__(self, dim: int, eps: float = NORM_EPS):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # fp32 statistics even under bf16 autocast (official: RMSNorm statistics in fp32).
        y = F.rms_norm(x.float(), (x.shape[-1],), self.weight.float(), self.eps)
        return y.to(x.dtype)


def _is_fake(t: torch.Tensor) -> bool:
    """Whether t is a FakeTensor (shapes only, no data)."""
    from torch._subclasses.fake_tensor import is_fake
    return is_fake(t)


def _autocast_device(device: torch.device) -> str:
    """Device type for `torch.autocast`; devices without autocast support (e.g. meta) map to "cpu", whose
    disabled-autocast context is then a harmless no-op."""
    return device.type if device.type in ("cuda", "cpu", "xpu", "mps", "hpu") else "cpu"


def modulate(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """adaLN modulation of tokens x [N, T, D] by per-sample shift/scale [N, D]: x * (1 + scale) + shift."""
    return torch.addcmul(shift.unsqueeze(1), x, 1 + scale.unsqueeze(1))  # one fused op in eager mode


def rope_tables(seq_len: int, head_dim: int, device, base: float = ROPE_BASE):
    """1-D rotary tables over token indices, rotate-half layout: (cos [T, Dh], signed sin [T, Dh]).

    Pair i of a head is (x[i], x[i + Dh/2]), rotated by angle pos / base^(2i/Dh). The sign of the first half
    of `sin` is folded in so `apply_rope` needs only a half swap, not a negation."""
    inv_freq = 1.0 / (base ** (torch.arange(0, head_dim, 2, device=device, dtype=torch.float32) / head_dim))
    pos = torch.arange(seq_len, device=device, dtype=torch.float32)
    freqs = torch.outer(pos, inv_freq)  # (T, Dh/2)
    cos = torch.cat([freqs.cos(), freqs.cos()], dim=-1)  # (T, Dh)
    sin = torch.cat([-freqs.sin(), freqs.sin()], dim=-1)  # (T, Dh)
    return cos, sin


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate x [N, H, T, Dh] by the tables of `rope_tables`; computed in fp32, returned in x's dtype."""
    xf = x.float()
    x1, x2 = xf.chunk(2, dim=-1)
    swapped = torch.cat([x2, x1], dim=-1)  # (x2, x1); the signs live in `sin`
    return torch.addcmul(xf * cos, swapped, sin).to(x.dtype)


class Attention(nn.Module):
    """Multi-head self-attention with qkv bias, per-head RMSNorm on q and k (QK-norm) and 1-D RoPE."""

    def __init__(self, dim: int, num_heads: int, attn_fp32: bool = False):
        super().__init__()
        if dim % num_heads != 0:
            raise ValueError(f"hidden_size={dim} is not divisible by num_heads={num_heads}")
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        if self.head_dim % 2 != 0:
            raise ValueError(f"head dim {self.head_dim} must be even for RoPE")
        self.attn_fp32 = attn_fp32
        self.qkv = nn.Linear(dim, 3 * dim, bias=True)
        self.q_norm = RMSNorm(self.head_dim)
        self.k_norm = RMSNorm(self.head_dim)
        self.proj = nn.Linear(dim, dim, bias=True)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        N, T, D = x.shape
        qkv = self.qkv(x).view(N, T, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)  # each (N, H, T, Dh)
        q = apply_rope(self.q_norm(q), cos, sin)
        k = apply_rope(self.k_norm(k), cos, sin)
        if self.attn_fp32:
            # official `attn_fp32: true` (ablation and pixel configs): attention in fp32 even under bf16 autocast.
            # Autocast would cast fp32 inputs of SDPA back to bf16 (it is on its lower-precision list), so it is
            # turned off around the call.
            with torch.autocast(_autocast_device(q.device), enabled=False):
                out = F.scaled_dot_product_attention(q.float(), k.float(), v.float())
            out = out.to(v.dtype)
        else:
            out = F.scaled_dot_product_attention(q, k, v)
        out = out.transpose(1, 2).reshape(N, T, D)  # (N, T, D)
        return self.proj(out)


class SwiGLU(nn.Module):
    """SwiGLU feed-forward: w3(silu(x W1) * (x W2)), with biases."""

    def __init__(self, dim: int, hidden_dim: int):
        super().__init__()
        self.w12 = nn.Linear(dim, 2 * hidden_dim, bias=True)
        self.w3 = nn.Linear(hidden_dim, dim, bias=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x1, x2 = self.w12(x).chunk(2, dim=-1)
        return self.w3(F.silu(x1) * x2)


class AlphaEmbedder(nn.Module):
    """Embeds the scalar CFG strength alpha: sinusoid_256 -> Linear -> SiLU -> Linear -> RMSNorm -> x0.02."""

    def __init__(self, hidden_size: int, frequency_embedding_size: int = ALPHA_FREQ_DIM):
        super().__init__()
        self.frequency_embedding_size = frequency_embedding_size
        self.mlp = nn.Sequential(
            nn.Linear(frequency_embedding_size, hidden_size, bias=True),
            nn.SiLU(),
            nn.Linear(hidden_size, hidden_size, bias=True),
        )
        self.norm = RMSNorm(hidden_size)

    @staticmethod
    def sinusoid(a: torch.Tensor, dim: int, max_period: float = 10000.0) -> torch.Tensor:
        """DiT timestep embedding of a [N] float tensor -> [N, dim] (cos half first, then sin)."""
        half = dim // 2
        freqs = torch.exp(-math.log(max_period) * torch.arange(half, device=a.device, dtype=torch.float32) / half)
        args = a.float()[:, None] * freqs[None]
        emb = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
        if dim % 2:
            emb = torch.cat([emb, torch.zeros_like(emb[:, :1])], dim=-1)
        return emb

    def forward(self, alpha: torch.Tensor) -> torch.Tensor:
        freq = self.sinusoid(alpha, self.frequency_embedding_size)
        return ALPHA_EMBED_SCALE * self.norm(self.mlp(freq))


class DriftBlock(nn.Module):
    """Transformer block with adaLN-zero conditioning (shift/scale/gate for attention and MLP)."""

    def __init__(self, hidden_size: int, num_heads: int, attn_fp32: bool = False):
        super().__init__()
        self.norm1 = RMSNorm(hidden_size)
        self.attn = Attention(hidden_size, num_heads, attn_fp32=attn_fp32)
        self.norm2 = RMSNorm(hidden_size)
        self.mlp = SwiGLU(hidden_size, swiglu_hidden_dim(hidden_size))
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(hidden_size, 6 * hidden_size, bias=True))

    def forward(self, x: torch.Tensor, c: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        # adaLN in fp32 (official); the fp32 gates keep the residual stream in fp32 under bf16 autocast.
        with torch.autocast(device_type=_autocast_device(c.device), enabled=False):
            mod = self.adaLN_modulation(c.float())
        shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = mod.chunk(6, dim=-1)
        x = torch.addcmul(x, gate_msa.unsqueeze(1), self.attn(modulate(self.norm1(x), shift_msa, scale_msa), cos, sin))
        x = torch.addcmul(x, gate_mlp.unsqueeze(1), self.mlp(modulate(self.norm2(x), shift_mlp, scale_mlp)))
        return x


class FinalLayer(nn.Module):
    """RMSNorm -> adaLN modulate (shift, scale) -> zero-initialized Linear to p*p*C_out per token."""

    def __init__(self, hidden_size: int, patch_size: int, out_channels: int):
        super().__init__()
        self.norm_final = RMSNorm(hidden_size)
        self.linear = nn.Linear(hidden_size, patch_size * patch_size * out_channels, bias=True)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(hidden_size, 2 * hidden_size, bias=True))

    def forward(self, x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        with torch.autocast(device_type=_autocast_device(c.device), enabled=False):
            mod = self.adaLN_modulation(c.float())
        shift, scale = mod.chunk(2, dim=-1)
        return self.linear(modulate(self.norm_final(x), shift, scale))


#################################################################################
#                                 Core model                                    #
#################################################################################


class DriftDiT(nn.Module):
    """One-step class-conditional generator f(noise, class, alpha, style) with a DiT backbone."""

    def __init__(
        self,
        input_size: int = 32,
        patch_size: int = 2,
        in_channels: int = 4,
        hidden_size: int = 768,
        depth: int = 12,
        num_heads: int = 12,
        num_classes: int = 1000,
        out_channels: Optional[int] = None,
        num_prefix_tokens: int = NUM_PREFIX_TOKENS,
        num_style_tokens: int = NUM_STYLE_TOKENS,
        style_codebook_size: int = STYLE_CODEBOOK_SIZE,
        attn_fp32: bool = False,
        grad_checkpointing: bool = False,
    ):
        super().__init__()
        for name, v in (("input_size", input_size), ("patch_size", patch_size), ("in_channels", in_channels),
                        ("hidden_size", hidden_size), ("depth", depth), ("num_heads", num_heads),
                        ("num_classes", num_classes), ("style_codebook_size", style_codebook_size)):
            if int(v) != v or v < 1:
                raise ValueError(f"{name} must be a positive integer, got {v!r}")
        if num_prefix_tokens < 0 or num_style_tokens < 0:
            raise ValueError("num_prefix_tokens and num_style_tokens must be >= 0")
        if input_size % patch_size != 0:
            raise ValueError(f"input_size={input_size} is not divisible by patch_size={patch_size}")
        # Constructor arguments, JSON-serializable: `DriftDiT(**model.config)` rebuilds the architecture
        # (checkpoints store this so samplers need no preset table).
        self.config = dict(input_size=input_size, patch_size=patch_size, in_channels=in_channels,
                           hidden_size=hidden_size, depth=depth, num_heads=num_heads, num_classes=num_classes,
                           out_channels=out_channels, num_prefix_tokens=num_prefix_tokens,
                           num_style_tokens=num_style_tokens, style_codebook_size=style_codebook_size,
                           attn_fp32=attn_fp32, grad_checkpointing=grad_checkpointing)
        self.input_size = input_size
        self.patch_size = patch_size
        self.in_channels = in_channels
        self.out_channels = in_channels if out_channels is None else out_channels
        self.hidden_size = hidden_size
        self.depth = depth
        self.num_heads = num_heads
        self.num_classes = num_classes
        self.num_prefix_tokens = num_prefix_tokens
        self.num_style_tokens = num_style_tokens
        self.style_codebook_size = style_codebook_size
        self.grad_checkpointing = grad_checkpointing
        self.grid_size = input_size // patch_size
        self.num_patches = self.grid_size**2

        # Embedders.
        self.x_embedder = nn.Linear(patch_size * patch_size * in_channels, hidden_size, bias=True)
        self.pos_embed = nn.Parameter(torch.empty(1, self.num_patches, hidden_size))  # learnable, sin-cos init
        self.y_embedder = nn.Embedding(num_classes, hidden_size)
        # One table holding the 32 separate 64-entry codebooks (official noise_embeds_0..31), so the 32
        # look-ups are a single gather; row i * 64 + s is entry s of codebook i.
        self.style_embedder = nn.Embedding(num_style_tokens * style_codebook_size, hidden_size)
        self.alpha_embedder = AlphaEmbedder(hidden_size)
        # In-context prefix tokens: Linear(cond) broadcast to every prefix slot + a learned per-slot embedding.
        self.prefix_proj = nn.Linear(hidden_size, hidden_size, bias=True)
        self.cls_embed = nn.Parameter(torch.empty(1, num_prefix_tokens, hidden_size))

        self.blocks = nn.ModuleList([DriftBlock(hidden_size, num_heads, attn_fp32=attn_fp32) for _ in range(depth)])
        self.final_layer = FinalLayer(hidden_size, patch_size, self.out_channels)
        if not any(p.is_meta for p in self.parameters()):
            self.initialize_weights()

    # ----------------------------------------------------------------------------------------------
    # Initialization (the only place weights are set; call it after `to_empty` when built on meta)
    # ----------------------------------------------------------------------------------------------
    @torch.no_grad()
    def initialize_weights(self) -> None:
        """Official init: xavier-uniform Linears with zero bias, N(0, 0.02) embeddings, sin-cos positions,
        unit RMSNorm scales, and zeros for every adaLN projection and the output layer (adaLN-zero). The alpha
        embedder's two Linears are N(0, 0.02) (official `weight_init="normal"`); the fused SwiGLU up-projection
        w12 is initialized as the official two separate Linears W1, W3 (dim -> hidden each)."""
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.xavier_uniform_(m.weight)
                nn.init.zeros_(m.bias)
            elif isinstance(m, nn.Embedding):
                nn.init.normal_(m.weight, std=0.02)
            elif isinstance(m, RMSNorm):
                nn.init.ones_(m.weight)
        for block in self.blocks:
            # xavier over each half's own [hidden, dim] shape: the fused [2*hidden, dim] bound would be narrower
            # (std 0.0203 instead of the official 0.0266 at width 768).
            for half in block.mlp.w12.weight.chunk(2, dim=0):
                nn.init.xavier_uniform_(half)
        for linear in (self.alpha_embedder.mlp[0], self.alpha_embedder.mlp[2]):
            nn.init.normal_(linear.weight, std=0.02)
        pos = get_2d_sincos_pos_embed(self.hidden_size, self.grid_size)
        self.pos_embed.copy_(pos.to(self.pos_embed.dtype).unsqueeze(0))
        nn.init.normal_(self.cls_embed, std=0.02)
        for block in self.blocks:
            nn.init.zeros_(block.adaLN_modulation[-1].weight)
            nn.init.zeros_(block.adaLN_modulation[-1].bias)
        nn.init.zeros_(self.final_layer.adaLN_modulation[-1].weight)
        nn.init.zeros_(self.final_layer.adaLN_modulation[-1].bias)
        nn.init.zeros_(self.final_layer.linear.weight)
        nn.init.zeros_(self.final_layer.linear.bias)

    # ----------------------------------------------------------------------------------------------
    # Helpers
    # ----------------------------------------------------------------------------------------------
    def sample_style(self, n: int, generator: Optional[torch.Generator] = None, device=None) -> torch.Tensor:
        """Draw n style index vectors uniformly: int64 [n, num_style_tokens] in [0, style_codebook_size)."""
        if device is None:
            device = generator.device if generator is not None else self.pos_embed.device
        return torch.randint(0, self.style_codebook_size, (n, self.num_style_tokens), generator=generator,
                             device=device, dtype=torch.long)

    def patchify(self, x: torch.Tensor) -> torch.Tensor:
        """(N, C, H, W) -> (N, T, p*p*C), patches in raster order, features ordered (p_row, p_col, C)."""
        N, C, H, W = x.shape
        p, g = self.patch_size, self.grid_size
        x = x.reshape(N, C, g, p, g, p)
        x = torch.einsum("nchpwq->nhwpqc", x)
        return x.reshape(N, g * g, p * p * C)

    def unpatchify(self, x: torch.Tensor) -> torch.Tensor:
        """(N, T, p*p*C_out) -> (N, C_out, H, W); the inverse of `patchify`."""
        N = x.shape[0]
        p, g, c = self.patch_size, self.grid_size, self.out_channels
        x = x.reshape(N, g, g, p, p, c)
        x = torch.einsum("nhwpqc->nchpwq", x)
        return x.reshape(N, c, g * p, g * p)

    def _check_inputs(self, noise, labels, alpha, style) -> None:
        # Shape and dtype checks are free (no host sync) and also run under torch.compile.
        C, S = self.in_channels, self.input_size
        if noise.dim() != 4 or tuple(noise.shape[1:]) != (C, S, S):
            raise ValueError(f"noise must have shape [N, {C}, {S}, {S}], got {tuple(noise.shape)}")
        N = noise.shape[0]
        if labels.shape != (N,) or labels.dtype not in (torch.int64, torch.int32):
            raise ValueError(f"labels must be an integer tensor of shape [{N}], got {labels.dtype} {tuple(labels.shape)}")
        if alpha.shape != (N,) or not alpha.is_floating_point():
            raise ValueError(f"alpha must be a float tensor of shape [{N}], got {alpha.dtype} {tuple(alpha.shape)}")
        if style is not None and (style.shape != (N, self.num_style_tokens)
                                  or style.dtype not in (torch.int64, torch.int32)):
            raise ValueError(f"style must be an integer tensor of shape [{N}, {self.num_style_tokens}], "
                             f"got {style.dtype} {tuple(style.shape)}")
        # Value checks read the data; do them only in eager mode on CPU, where they cost no device sync, and not
        # on fake tensors, which have no data (drift/precompile.py). (On CUDA an out-of-range index trips the
        # embedding kernel's own device assert.)
        if not torch.compiler.is_compiling() and labels.device.type == "cpu" and not _is_fake(labels):
            if labels.numel() and (int(labels.min()) < 0 or int(labels.max()) >= self.num_classes):
                raise ValueError(f"labels must lie in [0, {self.num_classes}), got range "
                                 f"[{int(labels.min())}, {int(labels.max())}]")
            if style is not None and style.numel() and (int(style.min()) < 0
                                                        or int(style.max()) >= self.style_codebook_size):
                raise ValueError(f"style indices must lie in [0, {self.style_codebook_size}), got range "
                                 f"[{int(style.min())}, {int(style.max())}]")

    def embed_condition(self, labels: torch.Tensor, alpha: torch.Tensor, style: torch.Tensor) -> torch.Tensor:
        """cond [N, D] = ClassEmbed(labels) + sum_i StyleEmbed_i(style[:, i]) + 0.02*RMSNorm(MLP(sin(alpha)))."""
        # The conditioning path is tiny ([N, D]); keep it in fp32 so adaLN sees full-precision inputs.
        with torch.autocast(device_type=_autocast_device(labels.device), enabled=False):
            offsets = torch.arange(self.num_style_tokens, device=style.device, dtype=style.dtype)
            offsets = offsets * self.style_codebook_size
            style_emb = self.style_embedder(style + offsets).sum(dim=1)  # (N, D)
            cond = self.y_embedder(labels) + style_emb + self.alpha_embedder(alpha)
        return cond.float()

    # ----------------------------------------------------------------------------------------------
    # Forward
    # ----------------------------------------------------------------------------------------------
    def forward(self, noise: torch.Tensor, labels: torch.Tensor, alpha: torch.Tensor,
                style: Optional[torch.Tensor] = None) -> torch.Tensor:
        """Generate x (N, C_out, H, W) from noise (N, C, H, W), labels (N,) int, alpha (N,) float and
        style (N, 32) int in [0, 64); style=None draws the indices uniformly with torch's global RNG.
        Under bf16 autocast the output is bf16 (the residual stream and conditioning stay fp32)."""
        self._check_inputs(noise, labels, alpha, style)
        N = noise.shape[0]
        if style is None:
            style = torch.randint(0, self.style_codebook_size, (N, self.num_style_tokens), device=noise.device)
        c = self.embed_condition(labels, alpha, style)  # (N, D) fp32

        x = self.x_embedder(self.patchify(noise)) + self.pos_embed  # (N, T, D)
        prefix = self.prefix_proj(c).unsqueeze(1) + self.cls_embed  # (N, P, D)
        x = torch.cat([prefix.to(x.dtype), x], dim=1)  # (N, P + T, D)

        cos, sin = rope_tables(x.shape[1], self.hidden_size // self.num_heads, x.device)
        for block in self.blocks:
            if self.grad_checkpointing and self.training and torch.is_grad_enabled():
                x = checkpoint(block, x, c, cos, sin, use_reentrant=False)
            else:
                x = block(x, c, cos, sin)

        x = self.final_layer(x[:, self.num_prefix_tokens:], c)  # (N, T, p*p*C_out); prefix dropped
        return self.unpatchify(x)  # (N, C_out, H, W)


#################################################################################
#                         Sine/cosine position embedding                        #
#################################################################################


def _1d_sincos(embed_dim: int, pos: torch.Tensor) -> torch.Tensor:
    """[M] positions -> [M, embed_dim] (sin half, then cos half), frequencies 1 / 10000^(2i/d)."""
    omega = torch.arange(embed_dim // 2, dtype=torch.float64) / (embed_dim / 2.0)
    omega = 1.0 / 10000**omega
    out = torch.outer(pos.reshape(-1).to(torch.float64), omega)  # (M, D/2)
    return torch.cat([torch.sin(out), torch.cos(out)], dim=1)


def get_2d_sincos_pos_embed(embed_dim: int, grid_size: int) -> torch.Tensor:
    """2-D sin-cos table [grid_size**2, embed_dim] in raster order: half the channels encode the column,
    half the row (the MAE/DiT layout). Computed in fp64 on the CPU."""
    if embed_dim % 4 != 0:
        # Pad odd widths with zeros rather than refuse: only the init value depends on it.
        base = get_2d_sincos_pos_embed(embed_dim - embed_dim % 4, grid_size) if embed_dim >= 4 else \
            torch.zeros(grid_size * grid_size, 0, dtype=torch.float64)
        return torch.cat([base, torch.zeros(grid_size * grid_size, embed_dim % 4, dtype=torch.float64)], dim=1)
    coords = torch.arange(grid_size, dtype=torch.float64)
    rows, cols = torch.meshgrid(coords, coords, indexing="ij")
    emb_w = _1d_sincos(embed_dim // 2, cols)
    emb_h = _1d_sincos(embed_dim // 2, rows)
    return torch.cat([emb_w, emb_h], dim=1)


#################################################################################
#                                  Presets                                      #
#################################################################################

# Paper presets: (hidden, depth, heads, patch) with the input each one is defined on.
_LATENT = dict(input_size=32, in_channels=4)  # SD-VAE latent of a 256x256 image
_PIXEL = dict(input_size=256, in_channels=3, attn_fp32=True)  # official pixel configs keep attention in fp32
_SMALL = dict(input_size=28, in_channels=1, num_classes=10)  # Fashion-MNIST-sized demo data


def _preset(hidden_size: int, depth: int, num_heads: int, patch_size: int, defaults: dict) -> Callable[..., DriftDiT]:
    def build(**kwargs) -> DriftDiT:
        cfg = dict(defaults, hidden_size=hidden_size, depth=depth, num_heads=num_heads, patch_size=patch_size)
        cfg.update(kwargs)
        return DriftDiT(**cfg)

    return build


DRIFT_MODELS: Dict[str, Callable[..., DriftDiT]] = {
    # Paper (Table 5/6): 133M, 463M latent; 134M, 464M pixel (num_classes=1000).
    "DriftDiT-B/2": _preset(768, 12, 12, 2, _LATENT),
    "DriftDiT-L/2": _preset(1024, 24, 16, 2, _LATENT),
    "DriftDiT-B/16": _preset(768, 12, 12, 16, _PIXEL),
    "DriftDiT-L/16": _preset(1024, 24, 16, 16, _PIXEL),
    # Small presets for 28-32 px data (default 28x28x1, 10 classes).
    "DriftDiT-S/2": _preset(384, 12, 6, 2, _SMALL),
    "DriftDiT-T/2": _preset(192, 12, 3, 2, _SMALL),
    "DriftDiT-T/4": _preset(192, 12, 3, 4, _SMALL),
    "DriftDiT-N/4": _preset(128, 6, 4, 4, _SMALL),
}


def build_generator_model(cfg, num_classes: int, input_size: int, in_channels: int) -> DriftDiT:
    """The generator a TrainConfig names (`cfg.model` in DRIFT_MODELS, with its size overrides)."""
    if cfg.model not in DRIFT_MODELS:
        raise ValueError(f"model must be one of {sorted(DRIFT_MODELS)}, got {cfg.model!r}")
    return DRIFT_MODELS[cfg.model](num_classes=num_classes, input_size=input_size, in_channels=in_channels,
                                   grad_checkpointing=cfg.grad_checkpointing, **cfg.model_kwargs())
