"""
The whole of nano-diffusion's model in one file. Read it top to bottom as the lesson it is:

1. How noise is added: a path from data (t = 0) to pure noise (t = 1), x_t = alpha_t * b * x0 + sigma_t * eps, the
   variance-preserving schedules of Chen 2023 (https://arxiv.org/abs/2301.10972) or SD3's rectified-flow straight line
   (https://arxiv.org/abs/2403.03206).
2. The network that learns to undo it: a diffusion transformer like PixArt-alpha's (https://arxiv.org/abs/2310.00426)
   told the time t and the class to draw, with three later changes that each trained faster here: U-ViT long skips,
   SwiGLU and 2-D RoPE.
3. The loss that teaches it: noise an image to a random t, and ask for the noise back (or a mix of noise and image).
4. The samplers that use it, from noise back to t = 0 in a few steps with guidance (https://arxiv.org/abs/2207.12598):
   DDIM (https://arxiv.org/abs/2010.02502) and DPM-Solver++(2M) (https://arxiv.org/abs/2211.01095).
"""

import inspect
import math
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

# --- 1. How noise is added: paths and schedules -----------------------------------------------------------------------
# Time is continuous, t in [0, 1]. A path says how much of the image (alpha_t) and how much noise (sigma_t) there is at
# time t. The loss and both samplers use nothing but alpha_sigma(t), so a new path needs no new sampler.
#
# - Variance preserving (VP): alpha_t^2 + sigma_t^2 = 1. Chen 2023 writes gamma(t) for alpha_t^2, the share of the
#   signal's variance left at t, falling from 1 to (nearly) 0 (VDM's gamma is another thing: minus the log-SNR). It is
#   clipped to [clip_min, 1], so alpha never reaches 0. The defaults are the paper's.
# - Flow: the straight line alpha_t = 1 - t, sigma_t = t between data and noise (rectified flow; SD3 section 2, SiT
#   https://arxiv.org/abs/2401.08740).
# - The input scale b (Chen 2023, section 3.2): the image is multiplied by b before it is noised, so b < 1 leaves less
#   signal at every t. The loss scales the data by b (step 2 of diffusion_loss); the samplers divide by b at the end.
# - The log signal-to-noise ratio lambda_t = log(alpha_t / sigma_t) falls from +inf (t = 0) to its lowest at t = 1
#   (-inf on the flow path): DPM-Solver++ spaces its steps by it.

def linear_gamma(t, clip_min=1e-9):
    return (1 - t).clamp(clip_min, 1.0)

def cosine_gamma(t, start=0.0, end=1.0, tau=1.0, clip_min=1e-9):
    # Stretch cos(pi/2 * u)^(2 tau) over u in [start, end] and renormalise to [1, 0].
    v_start = math.cos(start * math.pi / 2) ** (2 * tau)
    v_end = math.cos(end * math.pi / 2) ** (2 * tau)
    v = torch.cos((t * (end - start) + start) * math.pi / 2) ** (2 * tau)
    return ((v_end - v) / (v_end - v_start)).clamp(clip_min, 1.0)

def sigmoid_gamma(t, start=-3.0, end=3.0, tau=1.0, clip_min=1e-9):
    # Same idea with a sigmoid over [start, end]; larger tau flattens it.
    v_start = 1 / (1 + math.exp(-start / tau))
    v_end = 1 / (1 + math.exp(-end / tau))
    v = torch.sigmoid((t * (end - start) + start) / tau)
    return ((v_end - v) / (v_end - v_start)).clamp(clip_min, 1.0)

GAMMA_FUNCTIONS = {"linear": linear_gamma, "cosine": cosine_gamma, "sigmoid": sigmoid_gamma}

@dataclass
class NoiseSchedule:
    name: str  # 'linear', 'cosine', 'sigmoid' (variance preserving) or 'flow'
    params: dict  # the gamma function's parameters, every one of them (get_noise_schedule fills in the defaults)
    input_scale: float = 1.0  # b

    def gamma(self, t):
        """VP schedules: alpha_t^2, the share of the signal's variance left at time t."""
        return GAMMA_FUNCTIONS[self.name](t, **self.params)

    def alpha_sigma(self, t):
        """(alpha_t, sigma_t) of x_t = alpha_t * b * x0 + sigma_t * eps."""
        if self.name == "flow":
            return 1 - t, t
        gamma = self.gamma(t)
        return gamma.sqrt(), (1 - gamma).sqrt()

def get_noise_schedule(name, input_scale=1.0, **params):
    """get_noise_schedule('sigmoid', start=0, end=3, tau=0.5, input_scale=0.5), or 'flow'."""
    if name not in (*GAMMA_FUNCTIONS, "flow"):
        raise ValueError(f"unknown noise schedule {name!r}; choose one of {', '.join(GAMMA_FUNCTIONS)}, flow")
    signature = inspect.signature(GAMMA_FUNCTIONS[name]).parameters if name != "flow" else {}
    defaults = {k: p.default for k, p in list(signature.items())[1:]}  # all but t
    if unknown := set(params) - set(defaults):
        takes = f"takes {', '.join(defaults)}" if defaults else "takes no parameters"
        raise ValueError(f"noise schedule {name!r} {takes}, not {', '.join(sorted(unknown))}")
    if input_scale <= 0:
        raise ValueError(f"input_scale must be positive, got {input_scale}")
    return NoiseSchedule(name, defaults | params, float(input_scale))

# --- 2. The network that undoes the noise: a DiT with adaLN-single, a class token, long skips, SwiGLU and RoPE --------

@dataclass
class DiTConfig:
    input_size: int = 32  # height = width of the model's input (pixels, or latents)
    in_channels: int = 3  # 3 for RGB pixels, the VAE's latent channels for latents
    patch_size: int = 2  # each patch_size x patch_size square becomes one token
    n_layer: int = 12
    n_head: int = 12
    n_embd: int = 768
    mlp_ratio: float = 4.0
    num_classes: int = 10  # class ids 0..num_classes-1; id num_classes means "no class"
    dropout: float = 0.0
    prediction: str = "v"  # what the network outputs: 'eps', 'v' or 'velocity' (section 3; 'v' is not 'velocity')
    class_adaln: bool = False  # measurement: the class embedding added to the time embedding (DiT's adaLN) too
    self_cond: bool = False  # measurement: the network also sees its own last guess of x0 (Chen et al. 2022)
    contrastive: float = 0.0  # measurement: trained with Contrastive Flow Matching's lambda (the sampler undoes its scale)

    def __post_init__(self):
        if self.prediction not in ("v", "eps", "velocity", "x"):
            raise ValueError(f"prediction must be 'v', 'eps' or 'velocity', got {self.prediction!r}")
        if self.input_size % self.patch_size:
            raise ValueError(f"input {self.in_channels}x{self.input_size}x{self.input_size} is not divisible by "
                             f"patch_size {self.patch_size}")
        if self.n_embd % self.n_head:
            raise ValueError(f"n_embd {self.n_embd} is not divisible by n_head {self.n_head}")

def sincos_pos_embed_2d(n_embd, grid_size):
    """Fixed 2D sin-cos position embeddings (ViT-MAE, DiT), (grid_size**2, n_embd): half the channels for the row."""
    assert n_embd % 4 == 0, "n_embd must be divisible by 4 for 2D sin-cos embeddings"
    freqs = 1.0 / 10000 ** (torch.arange(n_embd // 4, dtype=torch.float64) / (n_embd // 4))
    coords = torch.arange(grid_size, dtype=torch.float64)
    rows, cols = torch.meshgrid(coords, coords, indexing="ij")  # (G, G) each
    angles = [pos.flatten()[:, None] * freqs[None, :] for pos in (rows, cols)]  # (G*G, n_embd/4) each
    return torch.cat([angles[0].sin(), angles[0].cos(), angles[1].sin(), angles[1].cos()], dim=1).float()

def rope_2d(head_dim, grid_size, base=100.0):
    """2-D rotary position embedding (RoPE, https://arxiv.org/abs/2104.09864; 2-D as in FiT, LightningDiT): cos and sin
    (grid_size**2, head_dim). Channels i and i + head_dim/2 of a query or key turn by one angle, half the pairs with the
    row, half with the column: a rotated q . k depends only on how far apart two patches are."""
    freqs = 1.0 / base ** (torch.arange(head_dim // 4, dtype=torch.float64) / (head_dim // 4))
    coords = torch.arange(grid_size, dtype=torch.float64)
    rows, cols = torch.meshgrid(coords, coords, indexing="ij")
    angles = torch.cat([rows.flatten()[:, None] * freqs, cols.flatten()[:, None] * freqs], dim=1).repeat(1, 2)
    return angles.cos().float(), angles.sin().float()

def apply_rope(x, cos, sin):
    # x (B, H, N, head_dim): each pair (x1, x2) becomes (x1 cos - x2 sin, x2 cos + x1 sin)
    x1, x2 = x.chunk(2, dim=-1)
    return x * cos + torch.cat([-x2, x1], dim=-1) * sin

def timestep_embedding(t, dim, max_period=10000):
    """Sinusoidal embedding of t in [0, 1], scaled by 1000: the frequencies see the range of DDPM's 1000 steps."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, device=t.device) / half)
    angles = 1000 * t.float()[:, None] * freqs[None, :]  # (B, half)
    return torch.cat([angles.cos(), angles.sin()], dim=1)  # (B, dim)

def modulate(x, shift, scale):
    return x * (1 + scale[:, None]) + shift[:, None]  # x (B, N, D); shift, scale (B, D)

class Attention(nn.Module):
    """Self-attention over the patch tokens, with the class token appended to the keys and values only. Why not
    cross-attention per block (as PixArt does for text)? With one class token it has one key, so its softmax is
    always 1: the same vector added to every patch. As one more key of self-attention the class stays a real attention:
    every patch decides how much to look at the class versus the other patches, with no extra layer."""

    def __init__(self, config):
        super().__init__()
        self.n_head = config.n_head
        self.dropout = config.dropout
        self.qkv = nn.Linear(config.n_embd, 3 * config.n_embd)  # one fused projection
        self.class_kv = nn.Linear(config.n_embd, 2 * config.n_embd)  # the class token's k, v
        self.proj = nn.Linear(config.n_embd, config.n_embd)
        self.proj_dropout = nn.Dropout(config.dropout)

    def forward(self, x, class_token, rope):
        (B, N, D), H = x.shape, self.n_head
        q, k, v = self.qkv(x).view(B, N, 3, H, D // H).permute(2, 0, 3, 1, 4)  # 3 x (B, H, N, D/H)
        q, k = apply_rope(q, *rope), apply_rope(k, *rope)  # the patches' positions; the class token has none
        # (B, 1, 2D) -> (2, B, H, 1, D/H)
        k_class, v_class = self.class_kv(class_token).view(B, 1, 2, H, D // H).permute(2, 0, 3, 1, 4)
        k = torch.cat([k_class, k], dim=2)  # (B, H, N+1, D/H)
        v = torch.cat([v_class, v], dim=2)
        x = F.scaled_dot_product_attention(q, k, v, dropout_p=self.dropout if self.training else 0.0)
        x = x.transpose(1, 2).reshape(B, N, D)  # (B, H, N, D/H) -> (B, N, D)
        return self.proj_dropout(self.proj(x))

class Block(nn.Module):
    """Pre-norm block modulated by the time (adaLN-single, PixArt-alpha section 2.3): each half shifts and scales its
    normalised input and gates what it adds to the residual. With long_skip it first merges in its mirror's output."""

    def __init__(self, config, long_skip=False):
        super().__init__()
        D = config.n_embd
        self.skip = nn.Linear(2 * D, D) if long_skip else None
        self.norm1 = nn.LayerNorm(D, elementwise_affine=False, eps=1e-6)
        self.attn = Attention(config)
        self.norm2 = nn.LayerNorm(D, elementwise_affine=False, eps=1e-6)
        # SwiGLU (https://arxiv.org/abs/2002.05202): a gated MLP 2/3 as wide as a GELU one of the same cost; faster here
        hidden = int(2 / 3 * D * config.mlp_ratio)
        self.fc, self.proj, self.dropout = nn.Linear(D, 2 * hidden), nn.Linear(hidden, D), nn.Dropout(config.dropout)
        # this block's offsets to the shared time modulation: shift, scale, gate for attention, then for the MLP
        self.modulation = nn.Parameter(torch.zeros(6, config.n_embd))

    def mlp(self, x):
        value, gate = self.fc(x).chunk(2, dim=-1)
        return self.dropout(self.proj(value * F.silu(gate)))

    def forward(self, x, class_token, time_modulation, rope, skip=None):
        # x (B, N, D); class_token (B, 1, D); time_modulation (B, 6, D), made once per step by DiT.adaln_single
        if self.skip is not None:
            x = self.skip(torch.cat([x, skip], dim=-1))
        modulation = (self.modulation[None] + time_modulation).unbind(1)
        shift_attn, scale_attn, gate_attn, shift_mlp, scale_mlp, gate_mlp = modulation
        x = x + gate_attn[:, None] * self.attn(modulate(self.norm1(x), shift_attn, scale_attn), class_token, rope)
        x = x + gate_mlp[:, None] * self.mlp(modulate(self.norm2(x), shift_mlp, scale_mlp))
        return x

class DiT(nn.Module):
    """Noisy image x_t, its time t and a class y in; the prediction (config.prediction, section 3) out, as x_t."""

    def __init__(self, config):
        super().__init__()
        self.config = config
        D, p = config.n_embd, config.patch_size
        self.grid_size = config.input_size // p
        self.patch_embed = nn.Conv2d(config.in_channels * (2 if config.self_cond else 1), D, kernel_size=p, stride=p)
        self.register_buffer("pos_embed", sincos_pos_embed_2d(D, self.grid_size)[None], persistent=False)  # (1, N, D)
        for name, table in zip(("rope_cos", "rope_sin"), rope_2d(D // config.n_head, self.grid_size)):
            self.register_buffer(name, table, persistent=False)  # (N, D/H) each
        self.t_freq_dim = 256
        self.t_embedder = nn.Sequential(nn.Linear(self.t_freq_dim, D), nn.SiLU(), nn.Linear(D, D))
        # adaLN-single: ONE layer turns the time into the 6 modulation vectors that all blocks share
        self.adaln_single = nn.Sequential(nn.SiLU(), nn.Linear(D, 6 * D))
        self.class_embed = nn.Embedding(config.num_classes + 1, D)  # +1: the "no class" id
        # Long skips (U-ViT, https://arxiv.org/abs/2209.12152): the last n_layer // 2 blocks each take the output of
        # their mirror among the first (block L-1 that of block 0, ...): shallow detail reaches the output directly
        L = config.n_layer
        self.blocks = nn.ModuleList([Block(config, long_skip=i >= L - L // 2) for i in range(L)])
        self.norm_out = nn.LayerNorm(D, elementwise_affine=False, eps=1e-6)
        self.out_modulation = nn.Parameter(torch.randn(2, D) / D**0.5)  # shift and scale before the output layer
        self.out = nn.Linear(D, p * p * config.in_channels)
        self._init_weights()

    def _init_weights(self):
        # As in DiT: xavier for linear layers, the patch embedding treated as a linear layer
        for module in self.modules():
            if isinstance(module, nn.Linear):
                nn.init.xavier_uniform_(module.weight)
                nn.init.zeros_(module.bias)
        nn.init.xavier_uniform_(self.patch_embed.weight.view(self.patch_embed.weight.shape[0], -1))
        nn.init.zeros_(self.patch_embed.bias)
        for weight in [self.t_embedder[0].weight, self.t_embedder[2].weight, self.class_embed.weight]:
            nn.init.normal_(weight, std=0.02)
        # the shared modulation and the output layer zero, and each block's gates: every block starts as the identity
        for param in (self.adaln_single[1].weight, self.adaln_single[1].bias, self.out.weight, self.out.bias):
            nn.init.zeros_(param)
        D = self.config.n_embd
        for block in self.blocks:
            with torch.no_grad():
                block.modulation.copy_(torch.randn(6, D) / D**0.5)
                block.modulation[[2, 5]] = 0.0  # the two gates

    def forward(self, x, t, y, x0_self=None):
        """x (B, C, H, W) noisy input; t (B,) float in [0, 1]; y (B,) long class ids, num_classes meaning "no class"."""
        B, C, H, W = x.shape
        p, D = self.config.patch_size, self.config.n_embd
        if self.config.self_cond:
            x = torch.cat([x, torch.zeros_like(x) if x0_self is None else x0_self.to(x.dtype)], dim=1)
        x = self.patch_embed(x).flatten(2).transpose(1, 2) + self.pos_embed  # (B, N, D)
        t_emb = self.t_embedder(timestep_embedding(t, self.t_freq_dim))  # (B, D)
        time_modulation = self.adaln_single(t_emb).view(B, 6, D)  # computed once, shared by all blocks
        class_token = self.class_embed(y)[:, None]  # (B, 1, D)
        if self.config.class_adaln:
            t_emb = t_emb + class_token[:, 0]
            time_modulation = self.adaln_single(t_emb).view(B, 6, D)
        rope, skips = (self.rope_cos, self.rope_sin), []
        for i, block in enumerate(self.blocks):
            x = block(x, class_token, time_modulation, rope, skips.pop() if block.skip is not None else None)
            if i < len(self.blocks) // 2:
                skips.append(x)
        shift, scale = (self.out_modulation[None] + t_emb[:, None]).unbind(1)  # 2 x (B, D)
        x = self.out(modulate(self.norm_out(x), shift, scale))  # (B, N, p*p*C)
        # unpatchify: (B, h*w, p*p*C) -> (B, C, h*p, w*p)
        x = x.view(B, H // p, W // p, p, p, C).permute(0, 5, 1, 3, 2, 4)
        return x.reshape(B, C, H, W)

    def num_params(self):
        return sum(p.numel() for p in self.parameters())

    def configure_optimizers(self, weight_decay, learning_rate, betas, device_type, optimizer="adamw", ns_steps=5):
        """Optimizers that hold every parameter: AdamW (decaying tensors of 2 or more dimensions), or with 'muon' Muon
        (https://kellerjordan.github.io/posts/muon/) for the blocks' matrices: it orthogonalises each one's momentum, so
        every direction moves at one rate, and learned faster per second here; its rate is matched to AdamW's."""
        params = [p for p in self.parameters() if p.requires_grad]
        muon = []
        if optimizer == "muon":
            if not hasattr(torch.optim, "Muon"):
                raise ValueError(f"torch {torch.__version__} has no torch.optim.Muon (2.9 and later do); upgrade torch "
                                 "or use optimizer='adamw'")
            muon = [p for name, p in self.blocks.named_parameters() if p.dim() == 2 and not name.endswith("modulation")]
        elif optimizer != "adamw":
            raise ValueError(f"unknown optimizer {optimizer!r}; choose adamw or muon")
        in_muon = {id(p) for p in muon}
        rest = [p for p in params if id(p) not in in_muon]
        groups = [{"params": [p for p in rest if p.dim() >= 2], "weight_decay": weight_decay},
                  {"params": [p for p in rest if p.dim() < 2], "weight_decay": 0.0}]
        adamw = torch.optim.AdamW(groups, lr=learning_rate, betas=betas, fused=device_type == "cuda")
        if not muon:
            return [adamw]
        return [torch.optim.Muon(muon, lr=learning_rate, weight_decay=weight_decay, adjust_lr_fn="match_rms_adamw",
                                ns_steps=ns_steps),
                adamw]

    def flops_per_image(self, training=True):
        """Matmul FLOPs (2 per multiply-add) of one image; training adds a backward twice as dear as the forward."""
        c, N = self.config, self.grid_size**2
        D, L, p, C, hidden = c.n_embd, c.n_layer, c.patch_size, c.in_channels, self.blocks[0].proj.in_features
        # qkv, the class token's k and v, q @ k^T and attention @ v over N+1 keys, projection, MLP
        per_block = 2 * N * D * 3 * D + 2 * D * 2 * D + 2 * 2 * N * (N + 1) * D + 2 * N * D * D + 2 * 3 * N * D * hidden
        # patch embedding, timestep MLP, adaLN-single, the blocks and their long skips, output layer
        forward = (2 * N * C * p * p * D + 2 * (self.t_freq_dim * D + D * D) + 2 * D * 6 * D + L * per_block
                   + L // 2 * 2 * N * 2 * D * D + 2 * N * D * p * p * C)
        return 3 * forward if training else forward

def unwrap_model(model):
    """The DiT inside a DistributedDataParallel and/or torch.compile wrapper."""
    model = getattr(model, "module", model)  # DDP
    return getattr(model, "_orig_mod", model)  # torch.compile

# --- 3. The loss: noise an image to a random time, and regress the network's output onto a target ---------------------
# The target, config.prediction. Two of the names are alike and mean different things:
#   'eps'       the noise itself (DDPM). To get x0 back the samplers divide by alpha_t, ~0 near pure noise: it cannot
#               work on the flow path (check_objective).
#   'v'         alpha_t * eps - sigma_t * x0 (https://arxiv.org/abs/2202.00512), a rotation of (eps, x0) made for VP
#               paths; it also works on the flow path.
#   'velocity'  eps - x0: the flow path's own velocity dx_t/dt (rectified flow, SD3, SiT); only on the flow path.

def check_objective(noise_schedule, prediction):
    """A clear error for a path and a prediction target that do not go together."""
    if prediction in ("velocity", "x") and noise_schedule.name != "flow":
        raise ValueError(f"prediction 'velocity' is the rectified-flow target eps - x0: use it with "
                         f"noise_schedule='flow' (with {noise_schedule.name!r}, use 'v' or 'eps')")
    if prediction == "eps" and noise_schedule.name == "flow":
        raise ValueError("prediction 'eps' cannot work with noise_schedule='flow': at t=1 the path is pure noise "
                         "(alpha = 0), so a predicted eps says nothing about x0; use prediction='velocity' (or 'v')")

def sample_t(batch_size, t_sampling, device, generator=None, t_mean=0.0, t_std=1.0):
    """Training times: 'uniform' on [0, 1], or 'logit_normal' (SD3 section 3.1), which trains more at mid-way times."""
    if t_sampling == "uniform":
        return torch.rand(batch_size, device=device, generator=generator)
    if t_sampling == "logit_normal":
        return torch.sigmoid(t_mean + t_std * torch.randn(batch_size, device=device, generator=generator))
    raise ValueError(f"t_sampling must be 'uniform' or 'logit_normal', got {t_sampling!r}")

def diffusion_loss(model, noise_schedule, x0, y, t_sampling="uniform", class_dropout=0.1, generator=None, t_mean=0.0,
                   t_std=1.0, contrastive=0.0, immiscible=0):
    """Mean squared error between the network's prediction and its target, on images x0 noised at random times."""
    config = unwrap_model(model).config
    B, device = x0.shape[0], x0.device
    # 1. a random time and noise for every image
    t = sample_t(B, t_sampling, device, generator, t_mean, t_std)
    eps = torch.randn(x0.shape, device=device, generator=generator)
    if immiscible > 1:  # measurement: each image takes the nearest of `immiscible` noises (Immiscible Diffusion, KNN)
        candidates = torch.randn((immiscible, *x0.shape), device=device, generator=generator)
        d = (candidates - x0 * noise_schedule.input_scale).flatten(2).square().sum(-1)  # (k, B)
        eps = candidates[d.argmin(0), torch.arange(B, device=device)]
    # 2. the noisy image on the path at that time (the data scaled by b first: section 1)
    alpha, sigma = (c.view(B, 1, 1, 1) for c in noise_schedule.alpha_sigma(t))
    x0 = x0 * noise_schedule.input_scale
    x_t = alpha * x0 + sigma * eps
    # 3. with probability class_dropout the "no class" id, so the network also learns the unconditional prediction
    if class_dropout > 0:
        drop = torch.rand(B, device=device, generator=generator) < class_dropout
        y = torch.where(drop, config.num_classes, y)
    # 4. regress the prediction onto its target
    target = {"eps": eps, "v": alpha * eps - sigma * x0, "velocity": eps - x0, "x": eps - x0}[config.prediction]
    x0_self = None
    if config.self_cond:  # measurement: the first half of the batch sees the network's own guess (no gradient)
        h = B // 2
        with torch.no_grad():
            guess = x_t[:h] - sigma[:h] * model(x_t[:h], t[:h], y[:h]).float()
        x0_self = torch.cat([guess, torch.zeros_like(x_t[h:])])
    out = model(x_t, t, y, x0_self).float()
    if config.prediction == "x":  # measurement (JiT): the network outputs x0, the loss is on the velocity it implies
        out = (x_t - out) / sigma.clamp(min=0.05)
    loss = F.mse_loss(out, target)
    if contrastive:  # measurement (Contrastive Flow Matching): away from another image's target
        loss = loss - contrastive * F.mse_loss(out, target.roll(1, 0))
    return loss

# --- 4. Sampling: walk the path back from pure noise to t = 0 ---------------------------------------------------------
# Every sampler here repeats one move. At the current point x (time t) the network guesses the clean image x0; the noise
# that goes with that guess is eps = (x - alpha_t x0) / sigma_t. DDIM puts both together at the next, lower noise level:
# a step of the probability-flow ODE, whose solution maps each x_T to one image. DPM-Solver++(2M) makes the same move
# with a better x0. Samplers work in b-scaled space and divide by b at the end.

GUIDE = None  # measurement: autoguidance's weaker model (Karras et al. 2024) in place of the unconditional one
GUIDE_INTERVAL = (0.0, 1.0)  # measurement: guidance only for t in this interval
GUIDE_NULL = False  # measurement: the guide told no class (autoguidance and classifier-free guidance at once)
TIME_SHIFT = 1.0  # measurement: DDIM's grid warped, t -> s t / (1 + (s - 1) t); s > 1 crowds the steps near the noise

def guided_prediction(model, x, t, y, cfg_scale=1.0, x0_self=None):
    """The output with classifier-free guidance, uncond + cfg_scale * (cond - uncond), both halves in ONE batch."""
    if cfg_scale == 1.0 or not GUIDE_INTERVAL[0] <= t[0].item() <= GUIDE_INTERVAL[1]:
        return model(x, t, y, x0_self).float()
    if GUIDE is not None:
        cond, guide = model(x, t, y, x0_self).float(), GUIDE(x, t, torch.full_like(y, unwrap_model(model).config.num_classes) if GUIDE_NULL else y, x0_self).float()
        return guide + cfg_scale * (cond - guide)
    null = torch.full_like(y, unwrap_model(model).config.num_classes)
    both = None if x0_self is None else torch.cat([x0_self, x0_self])
    cond, uncond = model(torch.cat([x, x]), torch.cat([t, t]), torch.cat([y, null]), both).float().chunk(2)
    return uncond + cfg_scale * (cond - uncond)

def predict_x0(model, x, t, y, alpha, sigma, cfg_scale=1.0, clip_x0=None, x0_self=None):
    """The (guided) guess of the clean image x0 (b-scaled) at x = alpha x0 + sigma eps. clip_x0 clamps it to the data's
    range: with 'eps' at t=1, where alpha ~ 3e-5, an error of the prediction is multiplied by ~3e4."""
    self_cond = unwrap_model(model).config.self_cond
    out = guided_prediction(model, x, torch.full((len(x),), t, device=x.device), y, cfg_scale,
                            x0_self if self_cond else None)
    out = out * (1 - unwrap_model(model).config.contrastive)  # (v - lambda v_other) / (1 - lambda); E v_other ~ 0
    prediction = unwrap_model(model).config.prediction
    if prediction == "eps":  # out = eps; alpha > 0 (VP gammas are clipped, check_objective rules out the flow path)
        x0 = (x - sigma * out) / alpha
    elif prediction == "x":
        x0 = out
    elif prediction == "velocity":  # out = eps - x0, and x = x0 + sigma (eps - x0) on the flow path
        x0 = x - sigma * out
    else:  # out = v = alpha eps - sigma x0, so alpha x - sigma v = (alpha^2 + sigma^2) x0: 1 on VP paths, not on flow
        x0 = (alpha * x - sigma * out) / (alpha**2 + sigma**2)
    return x0 if clip_x0 is None else x0.clamp(-clip_x0, clip_x0)

def ddim_step(x, x0, now, next, eta=0.0, noise=None):
    """One DDIM step (eq. 12) from x at the level now = (alpha, sigma) to next: x0 and its eps mixed at the next level.
    eta > 0 swaps part of eps for fresh noise(): eta = 1 draws from DDPM's posterior q(x_next | x, x0), whose std on
    any path is sigma_next * sqrt(1 - (alpha sigma_next / (alpha_next sigma))^2)."""
    (alpha, sigma), (alpha_next, sigma_next) = now, next
    eps = (x - alpha * x0) / sigma  # sigma > 0: the network is never asked at t = 0
    fresh = eta * sigma_next * math.sqrt(max(1 - (alpha * sigma_next / (alpha_next * sigma)) ** 2, 0.0))
    x_next = alpha_next * x0 + math.sqrt(max(sigma_next**2 - fresh**2, 0.0)) * eps
    return x_next + fresh * noise() if fresh > 0 else x_next

def solve(model, noise_schedule, x_T, y, ts, cfg_scale=1.0, clip_x0=None, second_order=False, eta=0.0, noise=None,
          trajectory=False):
    """Walk from x_T at ts[0] = 1 down the float64 times ts to 0: DDIM steps, or DPM-Solver++(2M)'s with second_order.
    Returns x0 (divided by b); with trajectory, (x0, path): 'x_t' (the points visited, x_T ... x_0) and 'x0_pred' (the
    guess at each but the last), divided by b too. eta > 0 (DDIM only) adds noise() (default torch.randn_like)."""
    if len(ts) < 2:
        raise ValueError(f"steps must be at least 1, got {len(ts) - 1}")
    b = noise_schedule.input_scale
    alphas, sigmas = noise_schedule.alpha_sigma(ts)
    alphas[-1], sigmas[-1] = 1.0, 0.0  # t = 0 is clean data, whatever the schedule's rounding
    lambdas = (alphas.log() - sigmas.log()).tolist()  # log-SNR: +inf at t = 0; -inf at t = 1 on the flow path
    levels = list(zip(alphas.tolist(), sigmas.tolist()))
    noise = noise or (lambda: torch.randn_like(x_T))
    x, x0_prev = x_T.float(), None
    path = {"x_t": [x / b], "x0_pred": []} if trajectory else None
    for i in range(len(ts) - 1):
        x0 = predict_x0(model, x, ts[i].item(), y, *levels[i], cfg_scale, None if clip_x0 is None else clip_x0 * b,
                        x0_prev)
        x0_step = x0
        if second_order and x0_prev is not None and math.isfinite(lambdas[i - 1]) and levels[i + 1][1] > 0:
            # DPM-Solver++(2M) (Algorithm 2): the last two guesses of x0 extrapolated linearly in lambda to the middle
            # of this step, r = previous step / this step in lambda. The first and last steps stay DDIM's (and on the
            # flow path, whose first lambda is -inf, the second).
            r = (lambdas[i] - lambdas[i - 1]) / (lambdas[i + 1] - lambdas[i])
            x0_step = x0 + (x0 - x0_prev) / (2 * r)
        x, x0_prev = ddim_step(x, x0_step, levels[i], levels[i + 1], eta, noise), x0
        if path:
            path["x_t"].append(x / b)
            path["x0_pred"].append(x0 / b)
    return (x / b, path) if trajectory else x / b

def uniform_times(noise_schedule, steps):
    """steps + 1 times from t = 1 down to t = 0, evenly spaced in t (DDIM's grid)."""
    ts = torch.linspace(1.0, 0.0, steps + 1, dtype=torch.float64)
    return TIME_SHIFT * ts / (1 + (TIME_SHIFT - 1) * ts)

def logsnr_times(noise_schedule, steps, lambda_range=(-5.0, 5.0)):
    """steps + 1 times from t = 1 to 0 evenly spaced in log-SNR (DPM-Solver's grid for pixels, section 3.3): the steps
    crowd where the image changes fast. It spans the paper's lambda_range, cut at the schedule's lowest lambda, and its
    ends then move to t = 1 and t = 0, lengthening the first and last steps a little."""
    alpha, sigma = noise_schedule.alpha_sigma(torch.ones((), dtype=torch.float64))
    lowest = max(lambda_range[0], (alpha.log() - sigma.log()).item())
    lambdas = torch.linspace(lowest, lambda_range[1], steps + 1, dtype=torch.float64)
    # lambda falls as t grows: find each time by bisection on [0, 1], 60 halvings for float64's resolution
    lo, hi = torch.zeros_like(lambdas), torch.ones_like(lambdas)
    for _ in range(60):
        mid = (lo + hi) / 2
        alpha, sigma = noise_schedule.alpha_sigma(mid)
        after_mid = alpha.log() - sigma.log() > lambdas  # mid still has too little noise: the time is later
        lo, hi = torch.where(after_mid, mid, lo), torch.where(after_mid, hi, mid)
    ts = (lo + hi) / 2
    ts[0], ts[-1] = 1.0, 0.0
    return ts

# Each sampler is solve() on a time grid, first or second order: DDIM steps evenly in t (eta > 0 adds noise);
# DPM-Solver++(2M) evenly in log-SNR with a second-order x0, nearer the ODE's solution in fewer steps, deterministic.
SAMPLERS = {"ddim": (uniform_times, False), "dpm++2m": (logsnr_times, True)}

def noise_streams(indices, seed):
    """A CPU generator per image, seeded by (seed, its index): image i's noise is the same in any batch or device."""
    return [torch.Generator().manual_seed(seed * 1_000_003 + i) for i in indices]

def draw(streams, shape):
    """The next standard normal noise of every stream, stacked: (len(streams), *shape) on the CPU."""
    return torch.stack([torch.randn(shape, generator=g) for g in streams])

@torch.no_grad()
def generate(model, noise_schedule, labels, shape, seed=0, batch_size=256, indices=None, sampler="ddim", steps=20,
             cfg_scale=1.0, clip_x0=None, eta=0.0, trajectory=False, bar=None):
    """Samples (model space, CPU) numbered indices (default 0, 1, ...) of these class ids, in batches, each one's noise
    from its own noise_streams generator; sampler is a name in SAMPLERS. With trajectory, (samples, solve()'s path)."""
    times, second_order = SAMPLERS[sampler]
    ts, device = times(noise_schedule, steps), next(unwrap_model(model).parameters()).device
    indices = list(range(len(labels)) if indices is None else indices)
    samples, paths = [], []
    for i in range(0, len(labels), batch_size):
        y = labels[i : i + batch_size].to(device)
        streams = noise_streams(indices[i : i + batch_size], seed)
        x_T = draw(streams, shape).to(device)
        out = solve(model, noise_schedule, x_T, y, ts, cfg_scale, clip_x0, second_order, eta,
                    noise=lambda: draw(streams, shape).to(device), trajectory=trajectory)
        x, path = out if trajectory else (out, {})
        samples.append(x.cpu())  # each batch leaves the device as it is done
        paths.append({k: [frame.cpu() for frame in frames] for k, frames in path.items()})
        if bar is not None:
            bar.update(len(y))
    if not trajectory:
        return torch.cat(samples)
    # each entry of the path: that step's frames of every batch, in order
    path = {k: [torch.cat(step) for step in zip(*[p[k] for p in paths])] for k in ("x_t", "x0_pred")}
    return torch.cat(samples), path
