"""Graph convolution (Kipf & Welling 2017) and graph attention (Velickovic et al. 2018),
written from scratch, each twice:

- sparse, O(E): messages gathered along the edge list and summed into their targets
  with index_add / scatter_reduce; this is what trains;
- dense, O(N^2) per graph: padded adjacency matrices and batched matmuls, the way the
  seed computed every layer; kept as the reference the tests compare against and as
  the baseline of the speed benchmark.

Both read the same parameters, so one model runs either way: `model(..., dense=True)`.
An edge (j, i) in `edge_index` carries a message from node j to node i. Graphs are simple
(no repeated edges, no self-loops: the layers add those) and `batch` is sorted, each graph's
nodes contiguous, as `data.GraphSet.batch` builds them.
"""
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F
from einops import rearrange


@dataclass
class GNNConfig:
    model: str = "gcn"      # gcn | gat
    in_dim: int = 3         # intensity, x, y
    hidden: int = 64
    layers: int = 4
    heads: int = 4          # GAT: hidden = heads x (hidden / heads), concatenated
    num_classes: int = 10
    dropout: float = 0.0


def add_self_loops(edge_index, num_nodes):
    loops = torch.arange(num_nodes, device=edge_index.device)
    return torch.cat([edge_index, torch.stack([loops, loops])], 1)


def count(index, size):
    """How often each of 0..size-1 occurs in index, as float32: a bincount that does not wait for the
    device (bincount reads the largest index on the host to size its output)."""
    ones = torch.ones(len(index), device=index.device)
    return torch.zeros(size, device=index.device).scatter_add_(0, index, ones)


def gcn_norm(edge_index, num_nodes):
    """Edges of A + I and d^-1/2, D the degree matrix of A + I: the weight of edge (j, i) in
    D^-1/2 (A + I) D^-1/2 is d_j^-1/2 d_i^-1/2. Every node has its self-loop, so d >= 1 and
    isolated nodes are fine."""
    edge_index = add_self_loops(edge_index, num_nodes)
    deg = count(edge_index[1], num_nodes)
    return edge_index, deg.rsqrt()


def segment_softmax(scores, index, num_nodes):
    """Softmax of scores (E, K) over the edges that share a target index[e]."""
    K = scores.shape[1]
    target = index[:, None].expand(-1, K)
    m = scores.new_full((num_nodes, K), float("-inf")).scatter_reduce(0, target, scores, "amax")
    e = (scores - m.detach().index_select(0, index)).exp()      # the max shift only keeps exp() finite
    return e / torch.zeros_like(m).index_add_(0, index, e).index_select(0, index)


class GCNLayer(nn.Module):
    """H' = D^-1/2 (A + I) D^-1/2 H W + b   (Kipf & Welling, eq. 2)."""

    def __init__(self, d_in, d_out):
        super().__init__()
        self.W = nn.Linear(d_in, d_out, bias=False)
        self.b = nn.Parameter(torch.zeros(d_out))

    prepare = staticmethod(gcn_norm)                            # what every layer of a forward shares

    def forward(self, h, edge_index, prepared=None):            # h (N, d_in), edge_index (2, E)
        edge_index, d = gcn_norm(edge_index, h.shape[0]) if prepared is None else prepared
        j, i = edge_index
        hw = self.W(h) * d[:, None]                             # D^-1/2 H W, (N, d_out)
        out = torch.zeros_like(hw).index_add_(0, i, hw.index_select(0, j))  # (A + I) D^-1/2 H W: sum over j
        return out * d[:, None] + self.b, None                  # D^-1/2 (A + I) D^-1/2 H W + b

    def forward_dense(self, h, adj):                            # h (B, n, d_in), adj (B, n, n) = A + I
        d = adj.sum(-1).rsqrt()                                 # (B, n)
        norm = d[:, :, None] * adj * d[:, None, :]              # D^-1/2 (A + I) D^-1/2
        return norm @ self.W(h) + self.b, None


class GATLayer(nn.Module):
    """Multi-head graph attention (Velickovic et al., eqs. 1-5):
        e_ij = LeakyReLU(a^T [W h_i || W h_j]),  alpha_ij = softmax over j in N(i) + {i} of e_ij,
        h_i' = ||_k sum_j alpha_ij^k W^k h_j.
    a^T [W h_i || W h_j] is split into a_dst . W h_i + a_src . W h_j, computed once per node."""

    def __init__(self, d_in, d_out, heads):
        super().__init__()
        self.K, self.d_head = heads, d_out // heads
        self.W = nn.Linear(d_in, d_out, bias=False)
        self.a_dst = nn.Parameter(torch.empty(heads, self.d_head))
        self.a_src = nn.Parameter(torch.empty(heads, self.d_head))
        self.b = nn.Parameter(torch.zeros(d_out))
        nn.init.xavier_uniform_(self.a_dst)
        nn.init.xavier_uniform_(self.a_src)

    prepare = staticmethod(add_self_loops)                      # what every layer of a forward shares

    def forward(self, h, edge_index, prepared=None):            # h (N, d_in), edge_index (2, E)
        N = h.shape[0]
        edge_index = add_self_loops(edge_index, N) if prepared is None else prepared
        j, i = edge_index
        z = rearrange(self.W(h), "n (k f) -> n k f", k=self.K)  # W^k h, (N, K, F)
        s_dst, s_src = (z * self.a_dst).sum(-1), (z * self.a_src).sum(-1)  # (N, K) each
        e = F.leaky_relu(s_dst.index_select(0, i) + s_src.index_select(0, j), 0.2)  # (E, K)
        alpha = segment_softmax(e, i, N)                        # (E, K), sums to 1 over each node's neighbours
        out = torch.zeros_like(z).index_add_(0, i, alpha[:, :, None] * z.index_select(0, j))
        return rearrange(out, "n k f -> n (k f)") + self.b, (edge_index, alpha)

    def forward_dense(self, h, adj):                            # h (B, n, d_in), adj (B, n, n) = A + I
        z = rearrange(self.W(h), "b n (k f) -> b k n f", k=self.K)
        s_dst = torch.einsum("bknf,kf->bkn", z, self.a_dst)
        s_src = torch.einsum("bknf,kf->bkn", z, self.a_src)
        e = F.leaky_relu(s_dst[..., :, None] + s_src[..., None, :], 0.2)   # (B, K, n_i, n_j)
        alpha = e.masked_fill(adj[:, None] == 0, float("-inf")).softmax(-1)
        return rearrange(alpha @ z, "b k n f -> b n (k f)") + self.b, alpha


def to_dense(x, edge_index, batch, num_graphs):
    """The disjoint graph as padded dense tensors: features (B, n, d), A + I (B, n, n) and a
    node mask (B, n). Padding nodes get only a self-loop, so they never send to real nodes."""
    counts = torch.bincount(batch, minlength=num_graphs)
    n = max(int(counts.max()), 1) if num_graphs else 1
    start = torch.cumsum(counts, 0) - counts
    pos = torch.arange(len(batch), device=x.device) - start[batch]   # node's place in its graph
    X = x.new_zeros(num_graphs, n, x.shape[1])
    X[batch, pos] = x
    mask = torch.zeros(num_graphs, n, dtype=torch.bool, device=x.device)
    mask[batch, pos] = True
    adj = torch.eye(n, device=x.device).repeat(num_graphs, 1, 1)
    j, i = edge_index
    adj[batch[i], pos[i], pos[j]] = 1.0
    return X, adj, mask


class GNN(nn.Module):
    """Encoder, L residual message-passing blocks, mean || max readout, MLP classifier."""

    def __init__(self, cfg: GNNConfig):
        super().__init__()
        if cfg.model not in ("gcn", "gat"):
            raise ValueError(f"unknown model {cfg.model!r}: choose gcn or gat")
        if cfg.model == "gat" and cfg.hidden % cfg.heads:
            raise ValueError(f"hidden {cfg.hidden} is not divisible by heads {cfg.heads}")
        self.cfg = cfg
        self.encoder = nn.Linear(cfg.in_dim, cfg.hidden)
        make = (lambda: GCNLayer(cfg.hidden, cfg.hidden)) if cfg.model == "gcn" else \
            (lambda: GATLayer(cfg.hidden, cfg.hidden, cfg.heads))
        self.convs = nn.ModuleList(make() for _ in range(cfg.layers))
        self.norms = nn.ModuleList(nn.LayerNorm(cfg.hidden) for _ in range(cfg.layers))
        self.head = nn.Sequential(nn.Linear(2 * cfg.hidden, cfg.hidden), nn.ReLU(), nn.Dropout(cfg.dropout),
                                  nn.Linear(cfg.hidden, cfg.num_classes))

    def num_params(self):
        return sum(p.numel() for p in self.parameters())

    def blocks(self, h, conv):
        """h <- h + Dropout(ReLU(LayerNorm(conv(h)))) for each layer; also the attention of each."""
        attentions = []
        for layer, norm in zip(self.convs, self.norms):
            out, att = conv(layer, h)
            h = h + F.dropout(F.relu(norm(out)), self.cfg.dropout, self.training)
            attentions.append(att)
        return h, attentions

    def forward(self, x, edge_index, batch, num_graphs, dense=False, return_attention=False):
        """Logits (G, classes) of the graphs of a disjoint batch: x (N, in_dim), edge_index (2, E),
        batch (N,). GAT's attention per layer: sparse (edge_index with loops, alpha (E', K)),
        dense alpha (B, K, n, n)."""
        if dense:
            X, adj, mask = to_dense(x, edge_index, batch, num_graphs)
            h, att = self.blocks(self.encoder(X), lambda layer, h: layer.forward_dense(h, adj))
            m = mask[..., None]
            mean = (h * m).sum(1) / m.sum(1).clamp(min=1)
            mx = h.masked_fill(~m, float("-inf")).amax(1)
            mx = mx.masked_fill(~m.any(1), 0.0)                 # an empty graph pools to 0, not -inf
        else:
            prepared = self.convs[0].prepare(edge_index, len(x))  # self-loops (and GCN's degrees) once, not per layer
            h, att = self.blocks(self.encoder(x), lambda layer, h: layer(h, edge_index, prepared))
            counts = count(batch, num_graphs).clamp(min=1)
            mean = h.new_zeros(num_graphs, h.shape[1]).index_add_(0, batch, h) / counts[:, None]
            mx = h.new_zeros(num_graphs, h.shape[1]).scatter_reduce(
                0, batch[:, None].expand_as(h), h, "amax", include_self=False)  # empty graphs stay 0
        logits = self.head(torch.cat([mean, mx], 1))            # readout: mean || max
        return (logits, att) if return_attention else logits
