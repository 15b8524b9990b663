"""
The whole of nano-diffusion's model in one file, readable top to bottom:

1. DiT: a diffusion transformer in the PixArt-alpha style (https://arxiv.org/abs/2310.00426):
   patches with fixed 2D sin-cos positions; adaLN-single (one shared MLP turns the timestep
   into every block's shift/scale/gate vectors, each block adds its own learned table); and
   attention to a learned class token (with a "no class" id for classifier-free guidance).
2. Noise schedules: the variance-preserving ones of Chen 2023, "On the Importance of Noise
   Scheduling for Diffusion Models" (https://arxiv.org/abs/2301.10972): linear, cosine,
   sigmoid, with the input scale b; and the rectified-flow straight line.
3. The training loss (shared by train.py and the tests): eps, v or flow-velocity targets.
4. Samplers with classifier-free guidance (https://arxiv.org/abs/2207.12598): DDIM
   (https://arxiv.org/abs/2010.02502) and DPM-Solver++(2M) (https://arxiv.org/abs/2211.01095).

Time is continuous: t in [0, 1], t = 0 is clean data, t = 1 is pure noise, and every
schedule is a path between them given by alpha_t and sigma_t:
    x_t = alpha_t * b * x_0 + sigma_t * eps,   eps ~ N(0, I)
"""

import inspect
import math
from collections import OrderedDict
from contextlib import nullcontext
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

# -----------------------------------------------------------------------------
# 1. The model


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
    prediction: str = "v"  # the target the model learns: 'v', 'eps' or 'velocity' (see diffusion_loss)
    skip: bool = False  # EXP: U-ViT long skips
    norm: str = "layer"  # EXP: 'layer' or 'rms'
    qk_norm: bool = False  # EXP
    mlp: str = "gelu"  # EXP: 'gelu' or 'swiglu'
    rope: bool = False  # EXP: 2D RoPE on q, k (patch tokens)

    def __post_init__(self):
        if self.prediction not in ("v", "eps", "velocity"):
            raise ValueError(f"prediction must be 'v', 'eps' or 'velocity', got {self.prediction!r}")
        if self.input_size % self.patch_size:
            raise ValueError(f"input {self.in_channels}x{self.input_size}x{self.input_size} is not divisible by patch_size {self.patch_size}")
        if self.n_embd % self.n_head:
            raise ValueError(f"n_embd {self.n_embd} is not divisible by n_head {self.n_head}")


def sincos_pos_embed_2d(n_embd, grid_size):
    """Fixed 2D sin-cos position embeddings (as in ViT-MAE and DiT): (grid_size**2, n_embd). Half of the channels encode
    the row, half the column, each as sin/cos at geometrically spaced frequencies."""
    assert n_embd % 4 == 0, "n_embd must be divisible by 4 for 2D sin-cos embeddings"
    freqs = 1.0 / 10000 ** (torch.arange(n_embd // 4, dtype=torch.float64) / (n_embd // 4))
    coords = torch.arange(grid_size, dtype=torch.float64)
    rows, cols = torch.meshgrid(coords, coords, indexing="ij")  # (G, G) each
    angles = [pos.flatten()[:, None] * freqs[None, :] for pos in (rows, cols)]  # (G*G, n_embd/4) each
    return torch.cat([angles[0].sin(), angles[0].cos(), angles[1].sin(), angles[1].cos()], dim=1).float()


def timestep_embedding(t, dim, max_period=10000):
    """Sinusoidal embedding of continuous t in [0, 1]. t is scaled by 1000 so the
    frequencies see the same range as with the usual 1000 discrete DDPM steps."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, device=t.device) / half)
    angles = 1000 * t.float()[:, None] * freqs[None, :]  # (B, half)
    return torch.cat([angles.cos(), angles.sin()], dim=1)  # (B, dim)


def modulate(x, shift, scale):
    # x (B, N, D); shift, scale (B, D)
    return x * (1 + scale[:, None]) + shift[:, None]


def rope_2d(head_dim, grid_size):
    """cos, sin (N, head_dim) for 2D RoPE: half the dims rotate with the row, half with the column."""
    quarter = head_dim // 4
    freqs = 1.0 / 100 ** (torch.arange(quarter, dtype=torch.float64) / quarter)
    coords = torch.arange(grid_size, dtype=torch.float64)
    rows, cols = torch.meshgrid(coords, coords, indexing="ij")
    angles = torch.cat([rows.flatten()[:, None] * freqs, cols.flatten()[:, None] * freqs], dim=1)  # (N, head_dim/2)
    angles = torch.cat([angles, angles], dim=1)  # (N, head_dim)
    return angles.cos().float(), angles.sin().float()


def apply_rope(x, cos, sin):
    x1, x2 = x.chunk(2, dim=-1)
    return x * cos + torch.cat([-x2, x1], dim=-1) * sin


class Attention(nn.Module):
    """Self-attention over the patch tokens, with the class token appended to the keys
    and values only.

    Why not a cross-attention layer per block (as PixArt does for text)? With a single
    class token, cross-attention has one key, so its softmax is always 1 and it
    degenerates into adding the same vector to every patch. Appending the class token
    to self-attention's keys/values keeps it a real attention: every patch decides how
    much to look at the class versus at the other patches, at the cost of one extra
    key (N+1 instead of N), and no extra layer."""

    def __init__(self, config):
        super().__init__()
        self.n_head = config.n_head
        self.dropout = config.dropout
        self.qkv = nn.Linear(config.n_embd, 3 * config.n_embd)  # one fused projection
        self.class_kv = nn.Linear(config.n_embd, 2 * config.n_embd)  # the class token's k, v
        self.proj = nn.Linear(config.n_embd, config.n_embd)
        self.proj_dropout = nn.Dropout(config.dropout)
        hd = config.n_embd // config.n_head
        self.q_norm = nn.RMSNorm(hd, eps=1e-6) if config.qk_norm else nn.Identity()
        self.k_norm = nn.RMSNorm(hd, eps=1e-6) if config.qk_norm else nn.Identity()

    def forward(self, x, class_token, rope=None):
        (B, N, D), H = x.shape, self.n_head
        # (B, N, 3D) -> (3, B, H, N, D/H)
        q, k, v = self.qkv(x).view(B, N, 3, H, D // H).permute(2, 0, 3, 1, 4)
        # (B, 1, 2D) -> (2, B, H, 1, D/H)
        k_class, v_class = self.class_kv(class_token).view(B, 1, 2, H, D // H).permute(2, 0, 3, 1, 4)
        q, k, k_class = self.q_norm(q), self.k_norm(k), self.k_norm(k_class)
        if rope is not None:
            q, k = apply_rope(q, *rope), apply_rope(k, *rope)
        k = torch.cat([k_class, k], dim=2)  # (B, H, N+1, D/H)
        v = torch.cat([v_class, v], dim=2)
        x = F.scaled_dot_product_attention(q, k, v, dropout_p=self.dropout if self.training else 0.0)
        x = x.transpose(1, 2).reshape(B, N, D)  # (B, H, N, D/H) -> (B, N, D)
        return self.proj_dropout(self.proj(x))


class SwiGLU(nn.Module):
    def forward(self, x):
        a, b = x.chunk(2, dim=-1)
        return F.silu(a) * b


class Block(nn.Module):
    """Pre-norm transformer block with adaLN-single modulation (PixArt-alpha section 2.3)."""

    def __init__(self, config):
        super().__init__()
        Norm = nn.RMSNorm if config.norm == "rms" else nn.LayerNorm
        self.norm1 = Norm(config.n_embd, elementwise_affine=False, eps=1e-6)
        self.attn = Attention(config)
        self.norm2 = Norm(config.n_embd, elementwise_affine=False, eps=1e-6)
        hidden = int(config.n_embd * config.mlp_ratio)
        if config.mlp == "swiglu":
            hidden = int(2 * hidden / 3)
            self.mlp = nn.Sequential(OrderedDict(fc=nn.Linear(config.n_embd, 2 * hidden), gelu=SwiGLU(),
                                                 proj=nn.Linear(hidden, config.n_embd), dropout=nn.Dropout(config.dropout)))
        else:
            self.mlp = nn.Sequential(OrderedDict(fc=nn.Linear(config.n_embd, hidden), gelu=nn.GELU(approximate="tanh"),
                                             proj=nn.Linear(hidden, config.n_embd), dropout=nn.Dropout(config.dropout)))
        self.skip_linear = None
        # This block's own learned embedding, added to the shared timestep modulation:
        # rows are shift/scale/gate for attention, then shift/scale/gate for the MLP.
        self.scale_shift_table = nn.Parameter(torch.zeros(6, config.n_embd))

    def forward(self, x, class_token, t_mod, rope=None, skip=None):
        # x (B, N, D); class_token (B, 1, D); t_mod (B, 6, D) from the shared adaLN-single MLP
        if self.skip_linear is not None:
            x = self.skip_linear(torch.cat([x, skip], dim=-1))
        shift_attn, scale_attn, gate_attn, shift_mlp, scale_mlp, gate_mlp = (self.scale_shift_table[None] + t_mod).unbind(1)
        x = x + gate_attn[:, None] * self.attn(modulate(self.norm1(x), shift_attn, scale_attn), class_token, rope)
        x = x + gate_mlp[:, None] * self.mlp(modulate(self.norm2(x), shift_mlp, scale_mlp))
        return x


class DiT(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.config = config
        D, p = config.n_embd, config.patch_size
        self.grid_size = config.input_size // p
        self.patch_embed = nn.Conv2d(config.in_channels, D, kernel_size=p, stride=p)
        self.register_buffer("pos_embed", sincos_pos_embed_2d(D, self.grid_size)[None], persistent=False)  # (1, N, D)
        self.t_freq_dim = 256
        self.t_embedder = nn.Sequential(nn.Linear(self.t_freq_dim, D), nn.SiLU(), nn.Linear(D, D))
        # adaLN-single: ONE linear layer makes the 6 modulation vectors for all blocks
        self.t_block = nn.Sequential(nn.SiLU(), nn.Linear(D, 6 * D))
        self.class_embed = nn.Embedding(config.num_classes + 1, D)  # +1: the "no class" id
        self.blocks = nn.ModuleList([Block(config) for _ in range(config.n_layer)])
        if config.skip:  # U-ViT: the second half of the blocks takes the first half's outputs, mirrored
            for block in self.blocks[config.n_layer - config.n_layer // 2:]:
                block.skip_linear = nn.Linear(2 * D, D)
        if config.rope:
            cos, sin = rope_2d(D // config.n_head, self.grid_size)
            self.register_buffer("rope_cos", cos, persistent=False)
            self.register_buffer("rope_sin", sin, persistent=False)
        self.norm_out = (nn.RMSNorm if config.norm == "rms" else nn.LayerNorm)(D, elementwise_affine=False, eps=1e-6)
        self.out_scale_shift_table = nn.Parameter(torch.randn(2, D) / D**0.5)
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
        # Zero the shared modulation, and give each block random shifts/scales but zero
        # gates: every block starts as the identity, and the output layer starts at zero.
        for param in (self.t_block[1].weight, self.t_block[1].bias, self.out.weight, self.out.bias):
            nn.init.zeros_(param)
        D = self.config.n_embd
        for block in self.blocks:
            with torch.no_grad():
                block.scale_shift_table.copy_(torch.randn(6, D) / D**0.5)
                block.scale_shift_table[[2, 5]] = 0.0  # the two gates

    def forward(self, x, t, y):
        """x (B, C, H, W) noisy input; t (B,) float in [0, 1]; y (B,) long class ids,
        y == num_classes meaning "no class". Returns the prediction (eps or v), shaped as x."""
        B, C, H, W = x.shape
        p, D = self.config.patch_size, self.config.n_embd
        x = self.patch_embed(x).flatten(2).transpose(1, 2) + self.pos_embed  # (B, N, D)
        t_emb = self.t_embedder(timestep_embedding(t, self.t_freq_dim))  # (B, D)
        t_mod = self.t_block(t_emb).view(B, 6, D)  # computed once, shared by all blocks
        class_token = self.class_embed(y)[:, None]  # (B, 1, D)
        rope = (self.rope_cos, self.rope_sin) if self.config.rope else None
        L, skips = self.config.n_layer, []
        for i, block in enumerate(self.blocks):
            skip = skips.pop() if block.skip_linear is not None else None
            x = block(x, class_token, t_mod, rope, skip)
            if self.config.skip and i < L // 2:
                skips.append(x)
        shift, scale = (self.out_scale_shift_table[None] + t_emb[:, None]).unbind(1)  # 2 x (B, D)
        x = self.out(modulate(self.norm_out(x), shift, scale))  # (B, N, p*p*C)
        # unpatchify: (B, h*w, p*p*C) -> (B, C, h*p, w*p)
        x = x.view(B, H // p, W // p, p, p, C).permute(0, 5, 1, 3, 2, 4)
        return x.reshape(B, C, H, W)

    def num_params(self):
        return sum(p.numel() for p in self.parameters())

    def configure_optimizers(self, weight_decay, learning_rate, betas, device_type, optimizer="adamw"):
        """AdamW, decaying the tensors of 2 or more dimensions (weights, embeddings, tables) but
        not the biases; fused into one kernel per step on CUDA."""
        params = [p for p in self.parameters() if p.requires_grad]
        if optimizer == "muon":
            hidden = [p for n, p in self.named_parameters() if n.startswith("blocks.") and p.dim() == 2 and "modulation" not in n and "scale_shift" not in n]
            ids = {id(p) for p in hidden}
            rest = [p for p in params if id(p) not in ids]
            return [torch.optim.Muon(hidden, lr=learning_rate, weight_decay=weight_decay, adjust_lr_fn="match_rms_adamw"),
                    torch.optim.AdamW([{"params": [p for p in rest if p.dim() >= 2], "weight_decay": weight_decay},
                                       {"params": [p for p in rest if p.dim() < 2], "weight_decay": 0.0}], lr=learning_rate, betas=betas)]
        groups = [{"params": [p for p in params if p.dim() >= 2], "weight_decay": weight_decay},
                  {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0}]
        return torch.optim.AdamW(groups, lr=learning_rate, betas=betas, fused=device_type == "cuda")

    def flops_per_image(self, training=True):
        """Matmul FLOPs (2 per multiply-add) for one image; training counts the forward pass and a backward pass twice
        as expensive. Elementwise ops, norms and softmax are left out: they are a few percent of the total."""
        c, N = self.config, self.grid_size**2
        D, L, p, C, hidden = c.n_embd, c.n_layer, c.patch_size, c.in_channels, int(c.n_embd * c.mlp_ratio)
        # qkv, the class token's k and v, q @ k^T and attention @ v over N+1 keys, projection, MLP
        per_block = 2 * N * D * 3 * D + 2 * D * 2 * D + 2 * 2 * N * (N + 1) * D + 2 * N * D * D + 2 * 2 * N * D * hidden
        # patch embedding, timestep MLP, adaLN-single, the blocks, output layer
        forward = 2 * N * C * p * p * D + 2 * (self.t_freq_dim * D + D * D) + 2 * D * 6 * D + L * per_block + 2 * N * D * p * p * C
        return 3 * forward if training else forward


def unwrap_model(model):
    """The DiT inside a DistributedDataParallel and/or torch.compile wrapper."""
    model = getattr(model, "module", model)  # DDP
    return getattr(model, "_orig_mod", model)  # torch.compile


# -----------------------------------------------------------------------------
# 2. Noise schedules. A schedule is a path from data (t = 0) to noise (t = 1):
#     x_t = alpha_t * b * x0 + sigma_t * eps
# and the loss and both samplers use nothing but alpha_sigma(t), so a new path needs
# no new sampler. The VP schedules of Chen 2023 (arXiv 2301.10972, Algorithm 1 and its
# reference code) give gamma(t) = alpha_t^2, falling from 1 to (nearly) 0, clipped to
# [clip_min, 1] so that alpha never reaches 0, and sigma_t^2 = 1 - gamma(t); the defaults
# are the paper's. 'flow' is the rectified-flow straight line alpha_t = 1 - t, sigma_t = t
# (SD3, arXiv 2403.03206, section 2; SiT, arXiv 2401.08740).


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
    params: dict
    input_scale: float = 1.0  # b: data is scaled by b before noising; b < 1 makes it noisier

    def gamma(self, t):
        """VP schedules: the fraction of signal variance left at time t, alpha_t^2."""
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
    allowed = list(inspect.signature(GAMMA_FUNCTIONS[name]).parameters)[1:] if name != "flow" else []  # all but t
    if unknown := set(params) - set(allowed):
        takes = f"takes {', '.join(allowed)}" if allowed else "takes no parameters"
        raise ValueError(f"noise schedule {name!r} {takes}, not {', '.join(sorted(unknown))}")
    if input_scale <= 0:
        raise ValueError(f"input_scale must be positive, got {input_scale}")
    return NoiseSchedule(name, dict(params), float(input_scale))


def check_objective(noise_schedule, prediction):
    """A clear error for a path and a prediction target that do not go together."""
    if prediction == "velocity" and noise_schedule.name != "flow":
        raise ValueError(f"prediction 'velocity' is the rectified-flow target eps - x0: use it with noise_schedule='flow' "
                         f"(with {noise_schedule.name!r}, use 'v' or 'eps')")
    if prediction == "eps" and noise_schedule.name == "flow":
        raise ValueError("prediction 'eps' cannot work with noise_schedule='flow': at t=1 the path is pure noise (alpha = 0), "
                         "so a predicted eps says nothing about x0; use prediction='velocity' (or 'v')")


# -----------------------------------------------------------------------------
# 3. The training loss


def sample_t(batch_size, t_sampling, device, generator=None):
    """Training timesteps: 'uniform' on [0, 1], or 'logit_normal' (SD3, arXiv 2403.03206,
    section 3.1: sigmoid of a standard normal) which spends more steps mid-way."""
    if t_sampling == "uniform":
        return torch.rand(batch_size, device=device, generator=generator)
    if t_sampling == "logit_normal":
        return torch.sigmoid(torch.randn(batch_size, device=device, generator=generator))
    raise ValueError(f"t_sampling must be 'uniform' or 'logit_normal', got {t_sampling!r}")


def diffusion_loss(model, noise_schedule, x0, y, t_sampling="uniform", class_dropout=0.1, generator=None, weighting="none"):
    """Mean squared error between the model's prediction and its target on x0 noised at
    random times. The targets: 'eps' (DDPM), 'v' = alpha eps - sigma x0 (Salimans & Ho
    2022, arXiv 2202.00512), 'velocity' = eps - x0, the flow path's dx_t/dt."""
    config = unwrap_model(model).config
    B, device = x0.shape[0], x0.device
    # 1. a random time and noise for every image
    t = sample_t(B, t_sampling, device, generator)
    eps = torch.randn(x0.shape, device=device, generator=generator)
    # 2. the noisy image on the path at that time
    alpha, sigma = (c.view(B, 1, 1, 1) for c in noise_schedule.alpha_sigma(t))
    x0 = x0 * noise_schedule.input_scale
    x_t = alpha * x0 + sigma * eps
    # 3. with probability class_dropout the "no class" id instead of the label, so that the
    #    same model also learns the unconditional prediction guidance needs
    if class_dropout > 0:
        drop = torch.rand(B, device=device, generator=generator) < class_dropout
        y = torch.where(drop, config.num_classes, y)
    # 4. regress the prediction onto its target
    target = {"eps": eps, "v": alpha * eps - sigma * x0, "velocity": eps - x0}[config.prediction]
    if weighting == "none":
        return F.mse_loss(model(x_t, t, y).float(), target)
    per = (model(x_t, t, y).float() - target).square().mean(dim=(1, 2, 3))
    snr = (alpha / sigma).square().view(B)
    # the x0-weight each target implies: eps: snr, v: snr + 1 (VP), velocity: 1 / sigma^2 (flow)
    implied = {"eps": snr, "v": (alpha**2 + sigma**2).view(B) / sigma.view(B) ** 2, "velocity": 1 / sigma.view(B) ** 2}[config.prediction]
    w = snr.clamp(max=5.0) / implied
    return (w * per).mean()


# -----------------------------------------------------------------------------
# 4. Sampling: classifier-free guidance, DDIM and DPM-Solver++(2M)


def guided_prediction(model, x, t, y, cfg_scale=1.0):
    """The model's prediction with classifier-free guidance: uncond + cfg_scale * (cond - uncond). The conditional and
    unconditional halves run as ONE batch of 2B; cfg_scale == 1 is plain conditional prediction (one pass of B)."""
    if cfg_scale == 1.0:
        return model(x, t, y).float()
    null = torch.full_like(y, unwrap_model(model).config.num_classes)
    cond, uncond = model(torch.cat([x, x]), torch.cat([t, t]), torch.cat([y, null])).float().chunk(2)
    return uncond + cfg_scale * (cond - uncond)


def predict_x0_eps(model, x, t, y, alpha, sigma, cfg_scale, clip_x0):
    """One (guided) model evaluation at x = alpha x0 + sigma eps, as predictions of x0 (in b-scaled space) and eps.
    clip_x0 clamps x0 to [-clip_x0, clip_x0], the data's range (times b): with eps prediction at t=1, alpha ~ 3e-5
    multiplies any error of eps by ~3e4 (v and velocity need no division, one reason they are preferred)."""
    config = unwrap_model(model).config
    out = guided_prediction(model, x, torch.full((len(x),), t, device=x.device), y, cfg_scale)
    if config.prediction == "eps":  # alpha > 0: VP gammas are clipped, check_objective rules out flow
        x0, eps = (x - sigma * out) / alpha, out
    elif config.prediction == "velocity":  # out = eps - x0 on the flow path, where alpha + sigma = 1
        x0, eps = x - sigma * out, x + alpha * out
    else:  # v = alpha eps - sigma x0; alpha^2 + sigma^2 is 1 on VP paths
        norm = alpha**2 + sigma**2
        x0, eps = (alpha * x - sigma * out) / norm, (sigma * x + alpha * out) / norm
    if clip_x0 is not None:
        x0 = x0.clamp(-clip_x0, clip_x0)
        eps = (x - alpha * x0) / sigma  # sigma > 0 at every model evaluation (t > 0)
    return x0, eps


def logsnr_times(noise_schedule, steps, lambda_range=(-5.0, 5.0)):
    """steps + 1 times from t=1 to t=0 whose inner points are evenly spaced in log-SNR lambda = log(alpha / sigma) over
    lambda_range (clipped to the schedule's own lambda(1)), found by bisection since lambda falls as t grows.
    DPM-Solver's grid for pixel models (Lu et al. 2022, section 3.3): the steps crowd where the image changes fast."""
    alpha, sigma = noise_schedule.alpha_sigma(torch.ones((), dtype=torch.float64))
    lambdas = torch.linspace(max(lambda_range[0], (alpha.log() - sigma.log()).item()), lambda_range[1], steps + 1, dtype=torch.float64)
    lo, hi = torch.zeros_like(lambdas), torch.ones_like(lambdas)
    for _ in range(60):  # 60 halvings: float64 resolution
        mid = (lo + hi) / 2
        alpha, sigma = noise_schedule.alpha_sigma(mid)
        later = alpha.log() - sigma.log() > lambdas  # still too little noise at mid
        lo, hi = torch.where(later, mid, lo), torch.where(later, hi, mid)
    ts = (lo + hi) / 2
    ts[0], ts[-1] = 1.0, 0.0  # start at pure noise, end at clean data
    return ts


def solve(model, noise_schedule, x_T, y, ts, cfg_scale=1.0, clip_x0=None, return_trajectory=False, eta=0.0, generator=None, second_order=False, cfg_interval=(0.0, 1.0)):
    """Integrate from x_T at ts[0] = 1 to ts[-1] = 0 over the float64 times ts: DDIM, or with
    second_order DPM-Solver++(2M). Returns x0 (divided by b), and with return_trajectory a
    dict of lists: 'x_t' (x_T ... x_0) and 'x0_pred' (one per step), all divided by b."""
    if len(ts) < 2:
        raise ValueError(f"steps must be at least 1, got {len(ts) - 1}")
    b = noise_schedule.input_scale
    alphas, sigmas = noise_schedule.alpha_sigma(ts)
    alphas[-1], sigmas[-1] = 1.0, 0.0  # t = 0 is clean data, whatever the schedule's rounding
    lambdas = (alphas.log() - sigmas.log()).tolist()  # log-SNR: +inf at t = 0, -inf at t = 1 on the flow path
    alphas, sigmas = alphas.tolist(), sigmas.tolist()
    x = x_T.float()
    trajectory = {"x_t": [x / b], "x0_pred": []}
    x0_prev = None
    for i in range(len(ts) - 1):
        a_t, s_t, a_s, s_s = alphas[i], sigmas[i], alphas[i + 1], sigmas[i + 1]  # from time t to the earlier time s
        scale = cfg_scale if cfg_interval[0] <= ts[i].item() <= cfg_interval[1] else 1.0
        x0, eps = predict_x0_eps(model, x, ts[i].item(), y, a_t, s_t, scale, None if clip_x0 is None else clip_x0 * b)
        x0_step, eps_step = x0, eps
        if second_order and x0_prev is not None and s_s > 0:
            # DPM-Solver++(2M) (Lu et al. 2022, arXiv 2211.01095, Algorithm 2) is this DDIM step
            # with a better x0: the last two predictions extrapolated linearly in lambda to the
            # middle of the step, r = previous step / this step, both measured in lambda.
            r = (lambdas[i] - lambdas[i - 1]) / (lambdas[i + 1] - lambdas[i])
            x0_step = x0 + (x0 - x0_prev) / (2 * r)
            eps_step = (x - a_t * x0_step) / s_t
        # DDIM step (Song et al. 2020, eq. 12): x0 and eps carried to the noise level of s; eta > 0
        # swaps part of eps for fresh noise (eta = 1: DDPM's posterior q(x_s | x_t, x0)).
        noise_std = eta * s_s * math.sqrt(max(1 - (a_t * s_s / (a_s * s_t)) ** 2, 0.0))
        x = a_s * x0_step + math.sqrt(max(s_s**2 - noise_std**2, 0.0)) * eps_step
        if noise_std > 0:
            x = x + noise_std * torch.randn(x.shape, device=x.device, generator=generator)
        x0_prev = x0
        if return_trajectory:
            trajectory["x_t"].append(x / b)
            trajectory["x0_pred"].append(x0 / b)
    return (x / b, trajectory) if return_trajectory else x / b


@torch.no_grad()
def ddim_sample(model, noise_schedule, x_T, y, steps=50, cfg_scale=1.0, eta=0.0, generator=None, return_trajectory=False, clip_x0=None, cfg_interval=(0.0, 1.0)):
    """DDIM (Song et al. 2020, arXiv 2010.02502) from t=1 to t=0 in `steps` model evaluations, evenly spaced in t. eta=0
    is deterministic, eta=1 adds DDPM-like noise at every step (drawn from generator). x_T (B, C, H, W) standard normal
    noise; y (B,) class ids (num_classes = unconditional); clip_x0 clamps each predicted x0 to [-clip_x0, clip_x0] (1.0
    for pixels in [-1, 1]). Returns x0, and with return_trajectory (x0, trajectory): see solve()."""
    ts = torch.linspace(1.0, 0.0, steps + 1, dtype=torch.float64)
    return solve(model, noise_schedule, x_T, y, ts, cfg_scale, clip_x0, return_trajectory, eta=eta, generator=generator, cfg_interval=cfg_interval)


@torch.no_grad()
def dpm_solver_sample(model, noise_schedule, x_T, y, steps=20, cfg_scale=1.0, generator=None, return_trajectory=False, clip_x0=None, cfg_interval=(0.0, 1.0)):
    """DPM-Solver++(2M) (Lu et al. 2022): multistep, second order, on the data prediction,
    with a first-order (DDIM) first and last step, over logsnr_times. Deterministic (generator
    is unused); otherwise the arguments and the result are ddim_sample's."""
    ts = logsnr_times(noise_schedule, steps)
    return solve(model, noise_schedule, x_T, y, ts, cfg_scale, clip_x0, return_trajectory, second_order=True, cfg_interval=cfg_interval)


SAMPLERS = {"ddim": ddim_sample, "dpm++2m": dpm_solver_sample}


def initial_noise(shape, indices, seed):
    """x_T for the images with these indices: image i's noise comes from its own CPU
    generator seeded from (seed, i), so it is the same whatever the batch size or device."""
    generator = torch.Generator()
    return torch.stack([torch.randn(shape, generator=generator.manual_seed(seed * 1_000_003 + i)) for i in indices])


@torch.no_grad()
def generate(model, noise_schedule, labels, shape, seed=0, batch_size=256, first_index=0, sampler="ddim", **sampler_kwargs):
    """Samples for many labels (model space, on the CPU), in batches of batch_size, from initial_noise(seed) of images
    first_index, first_index + 1, ... sampler_kwargs go to the sampler, 'ddim' or 'dpm++2m' (steps, cfg_scale, clip_x0,
    and DDIM's eta); with eta > 0 the added noise comes from one generator seeded with (seed, first_index)."""
    device = next(unwrap_model(model).parameters()).device
    step_generator = torch.Generator(device).manual_seed(seed * 1_000_003 + first_index)
    samples = []
    for i in range(0, len(labels), batch_size):
        y = labels[i : i + batch_size].to(device)
        x_T = initial_noise(shape, range(first_index + i, first_index + i + len(y)), seed).to(device)
        samples.append(SAMPLERS[sampler](model, noise_schedule, x_T, y, generator=step_generator, **sampler_kwargs).cpu())
    return torch.cat(samples)


def autocast_context(device, dtype):
    """bf16 autocast on the device for dtype 'bfloat16', nothing otherwise (float32)."""
    if dtype != "bfloat16":
        return nullcontext()
    return torch.autocast("cuda" if device.startswith("cuda") else device.split(":")[0], dtype=torch.bfloat16)


# Dense bf16 matmul peak of known GPUs (datasheet numbers, FLOP/s), for MFU.
GPU_PEAK_FLOPS = {"H200": 989e12, "H100": 989e12, "A100": 312e12, "L40S": 362e12, "L4": 121e12, "4090": 165e12, "A10": 125e12}


def gpu_peak_flops(device_name):
    """Peak bf16 FLOP/s of a GPU by (part of) its name, e.g. 'NVIDIA H100 80GB HBM3'; None if unknown."""
    return next((flops for name, flops in GPU_PEAK_FLOPS.items() if name in device_name), None)
