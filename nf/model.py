"""Real NVP (Dinh, Sohl-Dickstein & Bengio, "Density estimation using Real NVP", ICLR 2017).

A bijection f from images x to latents z of the same shape, built from affine coupling
layers, so that the exact log-likelihood follows from the change of variables (Sec. 3.1):

    log p_X(x) = log p_Z(f(x)) + log |det df(x)/dx^T|,   p_Z = N(0, I).

Classes in the order the data meets them: the logit preprocessing, the s/t ResNet, the
coupling layer, actnorm, one scale of the multi-scale architecture, and RealNVP.
"""
import math
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F


@dataclass
class FlowConfig:
    channels: int = 1       # image channels
    side: int = 28          # images are side x side
    n_couplings: int = 16   # coupling layers in all (see RealNVP.layout)
    scales: int = 2         # squeeze + factor-out steps; 0: one flat stack of checkerboard couplings
    hidden: int = 64        # feature maps of each s/t ResNet
    blocks: int = 4         # residual blocks of each s/t ResNet
    alpha: float = 0.05     # the logit transform's margin (the paper's alpha)


def squeeze(x):             # (B, C, H, W) -> (B, 4C, H/2, W/2): each 2x2 block becomes 4 channels
    return F.pixel_unshuffle(x, 2)                          # b c (h p) (w q) -> b (c p q) h w, in one op


def unsqueeze(x):           # the inverse of squeeze
    return F.pixel_shuffle(x, 2)


def checkerboard(h, w, parity):           # b: (1, 1, h, w), 1 on the squares whose x_i pass unchanged
    i, j = torch.arange(h), torch.arange(w)
    return ((i[:, None] + j[None, :] + parity) % 2).float()[None, None]


class ResNet(nn.Module):
    """The s and t functions of a coupling: conv, residual blocks, conv to 2 x c_out maps.
    The last conv starts at zero, so every coupling starts as the identity."""

    def __init__(self, c_in, c_out, hidden, blocks):
        super().__init__()
        self.inp = nn.Conv2d(c_in, hidden, 3, padding=1)
        self.blocks = nn.ModuleList(
            nn.Sequential(nn.ReLU(), nn.Conv2d(hidden, hidden, 3, padding=1),
                          nn.ReLU(), nn.Conv2d(hidden, hidden, 3, padding=1)) for _ in range(blocks))
        self.out = nn.Conv2d(hidden, 2 * c_out, 3, padding=1)
        nn.init.zeros_(self.out.weight)
        nn.init.zeros_(self.out.bias)

    def forward(self, x):       # -> (B, 2 c_out, H, W): s and t from one head, split by the coupling
        h = self.inp(x)
        for block in self.blocks:
            h = h + block(h)
        return self.out(F.relu(h))


class Coupling(nn.Module):
    """Affine coupling (Sec. 3.2-3.4), with a binary mask b (Sec. 3.4):

        y = b * x + (1 - b) * (x * exp(s(b * x)) + t(b * x)),
        log |det dy/dx^T| = sum_j ((1 - b) * s(b * x))_j         (Sec. 3.3: the Jacobian is triangular)

    checkerboard: b alternates over pixels (the ResNet also sees b, so a 0 it reads is not ambiguous);
    channel: b keeps one half of the channels and transforms the other. `parity` swaps the roles,
    so consecutive couplings update each other's unchanged half. s is tanh-bounded with a learned
    per-channel scale, which keeps exp(s) from exploding early in training. The checkerboard b and
    1 - b are built once, as buffers (not saved: they follow from side and parity)."""

    def __init__(self, c, side, mask, parity, hidden, blocks):
        super().__init__()
        assert mask == "checkerboard" or c % 2 == 0, "a channel mask splits an even number of channels"
        self.mask, self.parity = mask, parity
        c_in, c_out = (c + 1, c) if mask == "checkerboard" else (c // 2, c - c // 2)
        self.st = ResNet(c_in, c_out, hidden, blocks)
        self.s_scale = nn.Parameter(torch.ones(1, c_out, 1, 1))
        if mask == "checkerboard":
            b = checkerboard(side, side, parity)                # (1, 1, side, side)
            self.register_buffer("b", b, persistent=False)
            self.register_buffer("one_minus_b", 1 - b, persistent=False)

    def s_t(self, st):          # the ResNet's output (B, 2 c_out, H, W) -> s = lambda tanh(s_hat), t
        s, t = st.chunk(2, 1)
        return self.s_scale * torch.tanh(s), t

    def masked_s_t(self, x):    # checkerboard: s and t of b * x, zero where b = 1 (x * b = y * b)
        st = self.st(torch.cat([x * self.b, self.b.expand(len(x), -1, -1, -1)], 1))
        return self.s_t(self.one_minus_b * st)                  # (1 - b) s = lambda tanh((1 - b) s_hat): b is 0 or 1

    def split(self, x):         # channel mask: (x_1, x_2), x_1 conditions, x_2 is transformed
        x1, x2 = x[:, :x.shape[1] // 2], x[:, x.shape[1] // 2:]
        return (x2, x1) if self.parity else (x1, x2)

    def join(self, x1, x2):
        return torch.cat([x2, x1] if self.parity else [x1, x2], 1)

    def forward(self, x):       # x (B, C, H, W) -> y (B, C, H, W), log|det| (B,)
        if self.mask == "checkerboard":
            s, t = self.masked_s_t(x)                           # b * x passes unchanged
            return x * torch.exp(s) + t, s.sum((1, 2, 3))
        x1, x2 = self.split(x)  # y_1 = x_1, y_2 = x_2 * exp(s(x_1)) + t(x_1)   (Sec. 3.2)
        s, t = self.s_t(self.st(x1))
        return self.join(x1, x2 * torch.exp(s) + t), s.sum((1, 2, 3))

    def inverse(self, y):       # x = (y - t) * exp(-s): s and t only read the unchanged part (Sec. 3.3)
        if self.mask == "checkerboard":
            s, t = self.masked_s_t(y)
            return (y - t) * torch.exp(-s)
        y1, y2 = self.split(y)
        s, t = self.s_t(self.st(y1))
        return self.join(y1, (y2 - t) * torch.exp(-s))


class ActNorm(nn.Module):
    """y = (x - mu) / sigma per channel (Glow's actnorm, in place of the paper's batch norm):
    mu and sigma are set from a first batch (RealNVP.initialize), then learned.
    log|det| = H W sum log(1/sigma). Unlike batch norm it treats every image alone, so
    log p(x) does not depend on the batch. Until initialised it is the identity."""

    def __init__(self, c):
        super().__init__()
        self.bias = nn.Parameter(torch.zeros(1, c, 1, 1))      # -mu
        self.log_scale = nn.Parameter(torch.zeros(1, c, 1, 1))  # log(1 / sigma)
        self.init_pending = False                              # set by RealNVP.initialize for one forward

    def forward(self, x):
        if self.init_pending:
            with torch.no_grad():
                self.bias.copy_(-x.mean((0, 2, 3), keepdim=True))
                self.log_scale.copy_(-torch.log(x.std((0, 2, 3), keepdim=True) + 1e-6))
            self.init_pending = False
        log_det = self.log_scale.sum() * x.shape[2] * x.shape[3]
        return (x + self.bias) * torch.exp(self.log_scale), log_det.expand(len(x))

    def inverse(self, y):
        return y * torch.exp(-self.log_scale) - self.bias


class Scale(nn.Module):
    """One scale of the multi-scale architecture (Sec. 3.6):

        h -> checkerboard couplings -> squeeze -> channel couplings -> (h', z_i),
        z_i factored out (it goes straight to the Gaussian), h' to the next scale.

    The last scale has only checkerboard couplings. forward() puts z_i back where it came
    from (un-squeezed), so the output z has the input's shape."""

    def __init__(self, c, side, n_checker, n_channel, nxt, hidden, blocks):
        super().__init__()
        def steps(n, mask, c, side):  # each coupling is followed by an actnorm
            return nn.ModuleList(m for k in range(n)
                                 for m in (Coupling(c, side, mask, k % 2, hidden, blocks), ActNorm(c)))
        self.checker = steps(n_checker, "checkerboard", c, side)
        self.channel = steps(n_channel, "channel", 4 * c, side // 2) if nxt is not None else nn.ModuleList()
        self.next = nxt

    def forward(self, h):       # h (B, c, H, W) -> z (B, c, H, W), log|det| (B,)
        log_det = 0
        for layer in self.checker:
            h, ld = layer(h)
            log_det = log_det + ld
        if self.next is None:
            return h, log_det
        h = squeeze(h)                                          # (B, 4c, H/2, W/2)
        for layer in self.channel:
            h, ld = layer(h)
            log_det = log_det + ld
        h, z = h.chunk(2, 1)                                    # (B, 2c, H/2, W/2) each; z is factored out
        h, ld = self.next(h)
        return unsqueeze(torch.cat([h, z], 1)), log_det + ld

    def inverse(self, z):
        if self.next is not None:
            h, z_i = squeeze(z).chunk(2, 1)
            h = torch.cat([self.next.inverse(h), z_i], 1)
            for layer in reversed(self.channel):
                h = layer.inverse(h)
            z = unsqueeze(h)
        for layer in reversed(self.checker):
            z = layer.inverse(z)
        return z


class RealNVP(nn.Module):
    """x in [0, 1]^D (dequantised pixels) -> logit -> the multi-scale flow -> z ~ N(0, I)."""

    def __init__(self, cfg: FlowConfig):
        super().__init__()
        n_checker, n_final = self.layout(cfg.n_couplings, cfg.scales)
        if cfg.side % 2 ** cfg.scales:
            raise ValueError(f"{cfg.scales} scales squeeze by 2^{cfg.scales}, which does not divide side {cfg.side}")
        self.cfg = cfg
        flow, c = None, cfg.channels * 2 ** cfg.scales             # built from the innermost scale out
        for level in range(cfg.scales, -1, -1):
            last = level == cfg.scales
            flow = Scale(c, cfg.side // 2 ** level, n_final if last else n_checker, 0 if last else n_checker, flow,
                         cfg.hidden, cfg.blocks)
            c //= 2
        self.flow = flow
        self.D = cfg.channels * cfg.side ** 2

    @staticmethod
    def layout(n, scales):
        """n couplings over the scales: k checkerboard and k channel-wise per scale, k = n // (2 scales + 1),
        and the rest (checkerboard) at the last scale: 16 couplings, 2 scales -> 3 + 3, 3 + 3, 4 (the paper's)."""
        k = n // (2 * scales + 1)
        if k < 1:
            raise ValueError(f"{n} couplings are too few for {scales} scales (at least {2 * scales + 1})")
        return k, n - 2 * scales * k

    def preprocess(self, x):
        """y = logit(p), p = alpha + (1 - 2 alpha) x (Sec. 4.1), so the flow models an unbounded variable."""
        p = self.cfg.alpha + (1 - 2 * self.cfg.alpha) * x
        y = torch.log(p) - torch.log1p(-p)
        return y, self.logit_log_det(y)

    def logit_log_det(self, y):
        """log|dy/dx| = log(1 - 2 alpha) - log p - log(1 - p), written with y itself:
        -log p = softplus(-y), -log(1 - p) = softplus(y), finite even where sigmoid(y) rounds to 1."""
        return (math.log(1 - 2 * self.cfg.alpha) + F.softplus(y) + F.softplus(-y)).sum((1, 2, 3))

    def forward(self, x):       # x (B, C, H, W) in [0, 1] -> z (B, C, H, W), log|det dz/dx| (B,)
        y, ld_logit = self.preprocess(x)
        z, ld_flow = self.flow(y)
        return z, ld_logit + ld_flow

    def postprocess(self, y):   # the inverse of preprocess; sigmoid(y) in (0, 1) maps to x slightly past [0, 1]
        return (torch.sigmoid(y) - self.cfg.alpha) / (1 - 2 * self.cfg.alpha)

    def inverse(self, z):       # z (B, C, H, W) -> x (B, C, H, W)
        return self.postprocess(self.flow.inverse(z))

    @staticmethod
    def log_normal(z):          # log N(z; 0, I), summed per image (B,)
        return -0.5 * (z ** 2 + math.log(2 * math.pi)).sum((1, 2, 3))

    def log_prob(self, x):
        """log p_X(x) = log N(f(x); 0, I) + log|det df(x)/dx^T| (Sec. 3.1), in nats, per image (B,)."""
        z, log_det = self(x)
        return self.log_normal(z) + log_det

    def bits(self, log_prob):
        """-log2 p of the discrete pixels: x = (pixel + u) / 256, so the density of pixel + u on
        [0, 256)^D is p_X(x) / 256^D, and bits/dim = (-log p_X(x) + D log 256) / (D log 2)."""
        return (-log_prob + self.D * math.log(256)) / (self.D * math.log(2))

    def bits_per_dim(self, x):
        return self.bits(self.log_prob(x))

    @torch.no_grad()
    def sample(self, n, temperature=1.0, return_log_prob=False):
        """n images x = f^-1(z), z ~ N(0, temperature^2 I); with return_log_prob, also log p_X(x) (B,),
        computed from the latent side (x itself may sit where the logit rounds to infinity)."""
        device = next(self.parameters()).device
        z = temperature * torch.randn(n, self.cfg.channels, self.cfg.side, self.cfg.side, device=device)
        y = self.flow.inverse(z)
        x = self.postprocess(y)
        if not return_log_prob:
            return x
        _, log_det = self.flow(y)                               # log|det dz/dy|
        return x, self.log_normal(z) + log_det + self.logit_log_det(y)

    @torch.no_grad()
    def initialize(self, x):
        """Actnorm's data-dependent initialisation: each layer's output on x gets zero mean and unit
        variance per channel, layer after layer."""
        for m in self.modules():
            if isinstance(m, ActNorm):
                m.init_pending = True
        self(x)

    def num_params(self):
        return sum(p.numel() for p in self.parameters())
