"""DDPM (Ho et al. 2020): the noise schedule and its closed forms (`Diffusion`: Algorithm 1's
loss, Algorithm 2's reverse step, DDIM's step), then the U-Net eps_theta(x_t, t) that predicts
the noise, in the order an image meets it.

Indices: the paper's t = 1..T is t = 0..T-1 here, so alpha_bar[t] is the paper's alpha_bar_{t+1}
and "alpha_bar_{t-1}" of the first step is 1. Images are (B, C, H, W) on [-1, 1].
"""
import math
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F
from einops import rearrange


def linear_betas(T, beta_1=1e-4, beta_T=0.02):
    """Sec. 4: beta_t rising linearly from 1e-4 to 0.02 over T = 1000 steps."""
    return torch.linspace(beta_1, beta_T, T, dtype=torch.float64)


def cosine_betas(T, s=0.008):
    """Nichol & Dhariwal (2021), eq. 17: alpha_bar(t) = f(t) / f(0), f(t) = cos^2((t/T + s) / (1 + s) pi/2);
    beta_t = 1 - alpha_bar_t / alpha_bar_{t-1}, clipped at 0.999."""
    f = torch.cos((torch.arange(T + 1, dtype=torch.float64) / T + s) / (1 + s) * math.pi / 2) ** 2
    return (1 - f[1:] / f[:-1]).clamp(max=0.999)


class Diffusion(nn.Module):
    """The forward process q and the reverse steps, for a given schedule beta_1..beta_T.
    Schedule tensors are float64 buffers (exact closed forms), cast to the images' dtype on use."""

    def __init__(self, T=1000, schedule="linear"):
        super().__init__()
        betas = {"linear": linear_betas, "cosine": cosine_betas}[schedule](T)
        alphas = 1 - betas                                      # alpha_t = 1 - beta_t
        alpha_bar = torch.cumprod(alphas, 0)                    # alpha_bar_t = prod_{s<=t} alpha_s
        alpha_bar_prev = F.pad(alpha_bar[:-1], (1, 0), value=1.0)
        self.T = T
        self.register_buffer("betas", betas, persistent=False)
        self.register_buffer("alphas", alphas, persistent=False)
        self.register_buffer("alpha_bar", alpha_bar, persistent=False)
        self.register_buffer("alpha_bar_prev", alpha_bar_prev, persistent=False)
        # eq. 7: beta_tilde_t = (1 - alpha_bar_{t-1}) / (1 - alpha_bar_t) beta_t
        self.register_buffer("beta_tilde", (1 - alpha_bar_prev) / (1 - alpha_bar) * betas, persistent=False)

    @staticmethod
    def at(v, t, x):
        """v[t] shaped (B, 1, 1, 1) to broadcast against x, in x's dtype."""
        return v[t].to(x.dtype).view(-1, *[1] * (x.dim() - 1))

    def q_sample(self, x_0, t, eps):
        """eq. 4: q(x_t | x_0) = N(sqrt(alpha_bar_t) x_0, (1 - alpha_bar_t) I), reparameterised."""
        return self.at(self.alpha_bar.sqrt(), t, x_0) * x_0 + self.at((1 - self.alpha_bar).sqrt(), t, x_0) * eps

    def loss(self, eps_theta, x_0):
        """Algorithm 1 (eq. 14, L_simple): t ~ Uniform, eps ~ N(0, I),
        || eps - eps_theta(sqrt(alpha_bar_t) x_0 + sqrt(1 - alpha_bar_t) eps, t) ||^2."""
        t = torch.randint(0, self.T, (x_0.shape[0],), device=x_0.device)
        eps = torch.randn_like(x_0)
        return F.mse_loss(eps_theta(self.q_sample(x_0, t, eps), t).float(), eps)

    def predict_x0(self, x_t, t, eps):
        """eq. 4 solved for x_0: x_0 = (x_t - sqrt(1 - alpha_bar_t) eps) / sqrt(alpha_bar_t),
        clipped to the data range [-1, 1] (as Ho et al.'s code does when sampling)."""
        a = self.at(self.alpha_bar, t, x_t)
        return ((x_t - (1 - a).sqrt() * eps) / a.sqrt()).clamp(-1, 1)

    def posterior(self, x_0, x_t, t):
        """eq. 6-7: q(x_{t-1} | x_t, x_0) = N(mu_tilde, beta_tilde_t I),
        mu_tilde = sqrt(alpha_bar_{t-1}) beta_t / (1 - alpha_bar_t) x_0 + sqrt(alpha_t) (1 - alpha_bar_{t-1}) / (1 - alpha_bar_t) x_t."""
        one_minus_ab = 1 - self.alpha_bar
        c_0 = self.alpha_bar_prev.sqrt() * self.betas / one_minus_ab
        c_t = self.alphas.sqrt() * (1 - self.alpha_bar_prev) / one_minus_ab
        return self.at(c_0, t, x_t) * x_0 + self.at(c_t, t, x_t) * x_t, self.at(self.beta_tilde, t, x_t)

    def ddpm_step(self, x_t, t, eps, variance="beta_tilde", noise=None):
        """Algorithm 2, line 4: x_{t-1} = mu_theta(x_t, t) + sigma_t z, z ~ N(0, I) (z = 0 at the last step).
        mu_theta is eq. 11, 1/sqrt(alpha_t) (x_t - beta_t / sqrt(1 - alpha_bar_t) eps_theta), written as the
        posterior mean at the predicted (clipped) x_0; sigma_t^2 = beta_tilde_t or beta_t (Sec. 3.2: both work)."""
        mean, beta_tilde = self.posterior(self.predict_x0(x_t, t, eps), x_t, t)
        var = beta_tilde if variance == "beta_tilde" else self.at(self.betas, t, x_t)
        noise = torch.randn_like(x_t) if noise is None else noise
        return mean + (t > 0).view(-1, 1, 1, 1) * var.sqrt() * noise

    def ddim_step(self, x_t, t, t_prev, eps, eta=0.0, noise=None):
        """DDIM (Song et al. 2021), eq. 12, from step t to an earlier step t_prev (-1: the end):
        x_prev = sqrt(alpha_bar_prev) x_0 + sqrt(1 - alpha_bar_prev - sigma^2) eps + sigma z,
        sigma = eta sqrt((1 - alpha_bar_prev) / (1 - alpha_bar_t)) sqrt(1 - alpha_bar_t / alpha_bar_prev) (eq. 16).
        eps is re-derived from the clipped x_0, so the step stays consistent with it."""
        a_t = self.at(self.alpha_bar, t, x_t)
        a_prev = self.at(F.pad(self.alpha_bar, (1, 0), value=1.0), t_prev + 1, x_t)  # alpha_bar at -1 is 1
        x_0 = self.predict_x0(x_t, t, eps)
        eps = (x_t - a_t.sqrt() * x_0) / (1 - a_t).sqrt()
        sigma = eta * ((1 - a_prev) / (1 - a_t) * (1 - a_t / a_prev)).sqrt()
        noise = torch.randn_like(x_t) if noise is None else noise
        return a_prev.sqrt() * x_0 + (1 - a_prev - sigma ** 2).clamp(min=0).sqrt() * eps + sigma * noise

    def timesteps(self, sampler, steps):
        """The steps visited, last to first: all T for DDPM; for DDIM a sub-sequence tau of `steps`
        evenly spaced steps (Sec. 4.2), ending at t = 0."""
        if sampler == "ddpm":
            return list(range(self.T - 1, -1, -1))
        return [i * self.T // steps for i in range(steps - 1, -1, -1)]

    @torch.no_grad()
    def reverse(self, eps_theta, shape, sampler="ddpm", steps=None, eta=0.0, variance="beta_tilde", generator=None):
        """x_T ~ N(0, I), then the reverse steps down to x_0 (Algorithm 2, or DDIM), as a generator of
        (t, x_t) in the paper's 1..T numbering: x_T first, then the image after each step, (0, x_0) last.
        A caller that wants snapshots (the GIF) keeps the ones it likes; `sample` keeps only x_0."""
        device = self.betas.device

        def randn():  # drawn on the CPU from `generator`: the same samples on any device
            return torch.randn(shape, generator=generator).to(device)

        x = randn()                                             # Algorithm 2, line 1
        ts = self.timesteps(sampler, steps or self.T)
        for i, t in enumerate(ts):                              # line 2: for t = T, ..., 1
            yield t + 1, x
            t_batch = torch.full((shape[0],), t, device=device, dtype=torch.long)
            eps = eps_theta(x, t_batch).float()
            if sampler == "ddpm":                               # lines 3-4
                x = self.ddpm_step(x, t_batch, eps, variance, randn())
            else:
                t_prev = ts[i + 1] if i + 1 < len(ts) else -1
                x = self.ddim_step(x, t_batch, torch.full_like(t_batch, t_prev), eps, eta, randn())
        yield 0, x                                              # line 6: return x_0

    def sample(self, eps_theta, shape, sampler="ddpm", steps=None, eta=0.0, variance="beta_tilde", generator=None):
        """x_0 of the reverse process (Algorithm 2, or DDIM)."""
        for _, x in self.reverse(eps_theta, shape, sampler, steps, eta, variance, generator):
            pass
        return x


# ---------------------------------------------------------------------------------------------
# The noise predictor eps_theta(x_t, t): a U-Net (Sec. 4, Appendix B), PixelCNN++-style.

def timestep_embedding(t, dim):
    """Transformer sinusoidal position embedding of the step t (Sec. 4), (B,) -> (B, dim)."""
    half = dim // 2
    freqs = torch.exp(-math.log(10_000) * torch.arange(half, device=t.device) / half)
    angles = t.float()[:, None] * freqs[None]                   # (B, dim/2)
    return torch.cat([angles.sin(), angles.cos()], dim=1)


def norm(channels):
    """Group normalisation (Sec. 4): up to 8 groups, each of 4 or more feature maps."""
    return nn.GroupNorm(max((g for g in range(1, 9) if channels % g == 0 and channels >= 4 * g), default=1), channels)


class ResBlock(nn.Module):
    """GroupNorm -> SiLU -> conv, + the time embedding, GroupNorm -> SiLU -> dropout -> conv, + skip."""

    def __init__(self, c_in, c_out, t_dim, dropout):
        super().__init__()
        self.block1 = nn.Sequential(norm(c_in), nn.SiLU(), nn.Conv2d(c_in, c_out, 3, padding=1))
        self.time = nn.Sequential(nn.SiLU(), nn.Linear(t_dim, c_out))
        self.block2 = nn.Sequential(norm(c_out), nn.SiLU(), nn.Dropout(dropout), nn.Conv2d(c_out, c_out, 3, padding=1))
        nn.init.zeros_(self.block2[-1].weight)                  # each residual block starts as the identity
        nn.init.zeros_(self.block2[-1].bias)
        self.skip = nn.Conv2d(c_in, c_out, 1) if c_in != c_out else nn.Identity()

    def forward(self, x, t_emb):                                # x (B, c_in, H, W), t_emb (B, t_dim)
        h = self.block1(x) + self.time(t_emb)[:, :, None, None]
        return self.skip(x) + self.block2(h)                    # (B, c_out, H, W)


class Attention(nn.Module):
    """Self-attention over the H W positions of a low-resolution feature map, with a residual."""

    def __init__(self, channels, heads=4):
        super().__init__()
        self.heads = heads
        self.norm = norm(channels)
        self.qkv = nn.Conv2d(channels, 3 * channels, 1)
        self.out = nn.Conv2d(channels, channels, 1)
        nn.init.zeros_(self.out.weight)
        nn.init.zeros_(self.out.bias)

    def forward(self, x):                                       # (B, C, H, W)
        H, W = x.shape[2:]
        q, k, v = rearrange(self.qkv(self.norm(x)), "b (three n d) h w -> three b n (h w) d",
                            three=3, n=self.heads)
        h = F.scaled_dot_product_attention(q, k, v)             # (B, heads, H W, C / heads)
        return x + self.out(rearrange(h, "b n (h w) d -> b (n d) h w", h=H, w=W))


@dataclass
class UNetConfig:
    channels: int = 1              # image channels
    side: int = 28                 # image side; must be divisible by 2^(len(mults) - 1)
    base: int = 64                 # feature maps at full resolution
    mults: tuple = (1, 2, 2)       # feature maps = base * mult at 28, 14, 7
    res_blocks: int = 2            # residual blocks per resolution on the way down (one more on the way up)
    attn_levels: tuple = (2,)      # resolutions (by level: 0 is full) with self-attention; 2 is 7x7
    dropout: float = 0.1


class UNet(nn.Module):
    """eps_theta(x_t, t): down 28 -> 14 -> 7, a middle of ResBlock-Attention-ResBlock, up again, with a
    skip connection from every down-path feature map to the matching up-path block."""

    def __init__(self, cfg: UNetConfig):
        super().__init__()
        levels = len(cfg.mults)
        if cfg.side % 2 ** (levels - 1):
            raise ValueError(f"image side {cfg.side} is not divisible by 2^{levels - 1} for {levels} resolutions")
        self.cfg = cfg
        t_dim = 4 * cfg.base
        self.time_mlp = nn.Sequential(nn.Linear(cfg.base, t_dim), nn.SiLU(), nn.Linear(t_dim, t_dim))
        self.conv_in = nn.Conv2d(cfg.channels, cfg.base, 3, padding=1)

        def attn_or_id(level, c):
            return Attention(c) if level in cfg.attn_levels else nn.Identity()

        self.down, skips, c = nn.ModuleList(), [cfg.base], cfg.base
        for level, mult in enumerate(cfg.mults):
            for _ in range(cfg.res_blocks):
                self.down.append(nn.ModuleList([ResBlock(c, cfg.base * mult, t_dim, cfg.dropout),
                                                attn_or_id(level, cfg.base * mult)]))
                c = cfg.base * mult
                skips.append(c)
            if level < levels - 1:
                self.down.append(nn.Conv2d(c, c, 3, stride=2, padding=1))   # H -> H/2
                skips.append(c)
        self.mid_res1 = ResBlock(c, c, t_dim, cfg.dropout)     # the middle, at the lowest resolution
        self.mid_attn = Attention(c)
        self.mid_res2 = ResBlock(c, c, t_dim, cfg.dropout)
        self.up = nn.ModuleList()
        for level, mult in reversed(list(enumerate(cfg.mults))):
            for _ in range(cfg.res_blocks + 1):
                self.up.append(nn.ModuleList([ResBlock(c + skips.pop(), cfg.base * mult, t_dim, cfg.dropout),
                                              attn_or_id(level, cfg.base * mult)]))
                c = cfg.base * mult
            if level > 0:
                self.up.append(nn.Sequential(nn.Upsample(scale_factor=2, mode="nearest"),
                                             nn.Conv2d(c, c, 3, padding=1)))                  # H -> 2H
        self.out = nn.Sequential(norm(c), nn.SiLU(), nn.Conv2d(c, cfg.channels, 3, padding=1))

    def forward(self, x_t, t):                                  # x_t (B, C, H, W), t (B,) -> eps (B, C, H, W)
        t_emb = self.time_mlp(timestep_embedding(t, self.cfg.base))
        h = self.conv_in(x_t)
        hs = [h]
        for layer in self.down:
            if isinstance(layer, nn.ModuleList):
                res, attn = layer
                h = attn(res(h, t_emb))
            else:
                h = layer(h)
            hs.append(h)
        h = self.mid_res2(self.mid_attn(self.mid_res1(h, t_emb)), t_emb)
        for layer in self.up:
            if isinstance(layer, nn.ModuleList):
                res, attn = layer
                h = attn(res(torch.cat([h, hs.pop()], dim=1), t_emb))
            else:
                h = layer(h)
        return self.out(h)

    def num_params(self):
        return sum(p.numel() for p in self.parameters())


def rename_old_keys(state_dict):
    """A state dict saved before the middle blocks had names (`mid.0`, `mid.1`, `mid.2`) -> today's names."""
    old = {"mid.0.": "mid_res1.", "mid.1.": "mid_attn.", "mid.2.": "mid_res2."}
    return {next((new + k[len(o):] for o, new in old.items() if k.startswith(o)), k): v for k, v in state_dict.items()}
