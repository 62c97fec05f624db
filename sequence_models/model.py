"""Recurrent networks from tensor ops, then the two models built on them.

RNN (Elman 1990), LSTM (Hochreiter & Schmidhuber 1997, with the forget gate of Gers et al. 2000)
and GRU (Cho et al. 2014) behave like torch.nn.RNN / LSTM / GRU: the same constructor, call,
return values, gate order and state_dict keys (weight_ih_l0, weight_hh_l0, bias_ih_l0,
bias_hh_l0, ...), so weights load from the torch modules and back. Then, in the order the data
meets them: masked_pool, last_output -> SentimentClassifier (IMDb), LanguageModel (human numbers,
characters), and Bengio et al. (2003)'s MLPLanguageModel (characters).

Shapes: L time steps, N batch, H hidden size, G gates (RNN 1, LSTM 4, GRU 3), V vocabulary.
"""
import math
from typing import NamedTuple

import torch
import torch.nn as nn
import torch.nn.functional as F
from einops import rearrange


class Recurrent(nn.Module):
    """What the three cells share: per-layer weights, layout handling and the time loop.

    Each layer first projects the whole input sequence at once, W_ih x_t + b_ih for every t in
    one matrix product, so that only the recurrent half W_hh h_{t-1} + b_hh is left in the loop;
    the outputs are stacked once at the end. compile_step() fuses that loop's body, one time step,
    into a few kernels (torch.compile); the loop itself stays Python, so any length runs.
    """
    gates = 1

    def __init__(self, input_size, hidden_size, num_layers=1, bias=True, batch_first=False, dropout=0.0,
                 bidirectional=False):
        super().__init__()
        if bidirectional:
            raise NotImplementedError("bidirectional layers are not implemented")
        self.input_size, self.hidden_size, self.num_layers = input_size, hidden_size, num_layers
        self.bias, self.batch_first, self.dropout = bias, batch_first, dropout
        G, H = self.gates, hidden_size
        for k in range(num_layers):
            setattr(self, f"weight_ih_l{k}", nn.Parameter(torch.empty(G * H, input_size if k == 0 else H)))
            setattr(self, f"weight_hh_l{k}", nn.Parameter(torch.empty(G * H, H)))
            if bias:
                setattr(self, f"bias_ih_l{k}", nn.Parameter(torch.empty(G * H)))
                setattr(self, f"bias_hh_l{k}", nn.Parameter(torch.empty(G * H)))
        self.reset_parameters()

    def reset_parameters(self):
        # torch's initialisation: every weight and bias ~ U(-1/sqrt(H), 1/sqrt(H))
        bound = 1 / math.sqrt(self.hidden_size)
        for p in self.parameters():
            nn.init.uniform_(p, -bound, bound)

    def layer(self, k):
        b = (getattr(self, f"bias_ih_l{k}"), getattr(self, f"bias_hh_l{k}")) if self.bias else (None, None)
        return getattr(self, f"weight_ih_l{k}"), getattr(self, f"weight_hh_l{k}"), *b

    def cell(self, xw_t, hw_t, state):
        """One step from the two projections (N, G*H) and the previous state to the new state."""
        raise NotImplementedError

    def step(self, xw_t, state, W_hh, b_hh):
        """One time step: W_hh h_{t-1} + b_hh, then the cell."""
        return self.cell(xw_t, F.linear(state[0], W_hh, b_hh), state)

    def compile_step(self, **options):
        """Fuse step() with torch.compile: the matrix product and one kernel for the gates, forward
        and backward, instead of a dozen element-wise ops (what a GPU pays per op is the launch)."""
        self.step = torch.compile(self.step, **options)

    def forward(self, input, hx=None):
        # input (L, N, in), or (N, L, in) with batch_first, or unbatched (L, in)
        batched = input.dim() == 3
        x = input if not batched else input.transpose(0, 1) if self.batch_first else input
        x = x if batched else x.unsqueeze(1)                                   # (L, N, in)
        L, N = x.shape[:2]
        states = self.initial_states(hx, batched, N, x)                        # per layer: (h,) or (h, c)
        finals = []
        for k in range(self.num_layers):
            W_ih, W_hh, b_ih, b_hh = self.layer(k)
            if k > 0 and self.dropout and self.training:
                x = F.dropout(x, self.dropout)                                # between layers, as torch
            xw = F.linear(x.flatten(0, 1), W_ih, b_ih).view(L, N, -1)          # (L N, in) -> (L, N, G*H): all t at once
            state, outputs = states[k], []
            with torch.autocast(x.device.type, enabled=False):  # float32 recurrence: its rounding compounds over t
                for xw_t in xw.unbind(0):  # unbind, not xw[t]: one backward for all t instead of L
                    state = self.step(xw_t, state, W_hh, b_hh)
                    outputs.append(state[0])
            x = torch.stack(outputs)                                           # (L, N, H)
            finals.append(state)
        output = x.transpose(0, 1) if self.batch_first and batched else x if batched else x.squeeze(1)
        final = [torch.stack(s) for s in zip(*finals)]                         # each (num_layers, N, H)
        if not batched:
            final = [s.squeeze(1) for s in final]
        return output, final[0] if len(final) == 1 else tuple(final)

    def initial_states(self, hx, batched, N, x):
        """hx (num_layers, N, H) (a tuple of two for the LSTM), or zeros; -> one tuple per layer,
        copied out of hx so that every step gets a tensor of its own, as a compiled step expects."""
        n_state = 2 if isinstance(self, LSTM) else 1
        if hx is None:
            hx = (x.new_zeros(self.num_layers, N, self.hidden_size),) * n_state
        else:
            hx = [h if batched else h.unsqueeze(1) for h in (hx if n_state == 2 else (hx,))]
        return [tuple(h[k].clone() for h in hx) for k in range(self.num_layers)]


class RNN(Recurrent):
    def __init__(self, input_size, hidden_size, num_layers=1, nonlinearity="tanh", bias=True, batch_first=False,
                 dropout=0.0, bidirectional=False):  # torch.nn.RNN's order: nonlinearity comes fourth
        super().__init__(input_size, hidden_size, num_layers, bias, batch_first, dropout, bidirectional)
        self.nonlinearity = {"tanh": torch.tanh, "relu": torch.relu}[nonlinearity]

    def cell(self, xw_t, hw_t, state):
        # h_t = tanh(W_ih x_t + b_ih + W_hh h_{t-1} + b_hh)
        return (self.nonlinearity(xw_t + hw_t),)


class LSTM(Recurrent):
    gates = 4

    def cell(self, xw_t, hw_t, state):
        c = state[1]
        # [i, f, g, o] = W_ih x_t + b_ih + W_hh h_{t-1} + b_hh, in torch's gate order
        i, f, g, o = (xw_t + hw_t).chunk(4, dim=-1)
        i, f, g, o = torch.sigmoid(i), torch.sigmoid(f), torch.tanh(g), torch.sigmoid(o)
        c = f * c + i * g           # c_t = f_t * c_{t-1} + i_t * g_t
        h = o * torch.tanh(c)       # h_t = o_t * tanh(c_t)
        return h, c


class GRU(Recurrent):
    gates = 3

    def cell(self, xw_t, hw_t, state):
        h = state[0]
        x_r, x_z, x_n = xw_t.chunk(3, dim=-1)
        h_r, h_z, h_n = hw_t.chunk(3, dim=-1)
        r = torch.sigmoid(x_r + h_r)         # r_t = σ(W_ir x_t + b_ir + W_hr h_{t-1} + b_hr)
        z = torch.sigmoid(x_z + h_z)         # z_t = σ(W_iz x_t + b_iz + W_hz h_{t-1} + b_hz)
        n = torch.tanh(x_n + r * h_n)        # n_t = tanh(W_in x_t + b_in + r_t * (W_hn h_{t-1} + b_hn))
        return ((1 - z) * n + z * h,)        # h_t = (1 - z_t) * n_t + z_t * h_{t-1}


CELLS = {"rnn": RNN, "lstm": LSTM, "gru": GRU}


def masked_pool(outputs, mask):
    """Concat pooling over the real time steps only: [mean_t o_t ; max_t o_t].

    outputs (N, L, H), mask (N, L) True at tokens, False at padding -> (N, 2H).
    """
    m = mask.unsqueeze(-1)
    mean = (outputs * m).sum(1) / m.sum(1).clamp(min=1)
    max_ = outputs.masked_fill(~m, float("-inf")).amax(1)
    return torch.cat([mean, max_], dim=-1)


def last_output(outputs, mask):
    """h_T, each row's output at its last real token (padding is on the right): (N, L, H) -> (N, H)."""
    T = mask.sum(1) - 1                                                    # (N,) index of the last token
    return outputs[torch.arange(outputs.size(0), device=outputs.device), T]


class SentimentClassifier(nn.Module):
    """Embedding -> recurrent layers -> pooling -> linear. pooling 'meanmax': [mean; max] over the
    real time steps; 'concat': ULMFiT's concat pooling (Howard & Ruder 2018, §3.3), the last
    step's output in front, [h_T; max; mean].

    Padding sits at the end of each row, so a one-directional network's outputs at real tokens
    never see it, and masked_pool leaves it out of the pooling.
    """

    def __init__(self, vocab_size, cell="lstm", emb_size=128, hidden_size=256, num_layers=1, dropout=0.3,
                 num_classes=2, pooling="meanmax"):
        super().__init__()
        self.pooling = pooling
        self.embedding = nn.Embedding(vocab_size, emb_size, padding_idx=0)
        self.rnn = CELLS[cell](emb_size, hidden_size, num_layers, batch_first=True, dropout=dropout)
        self.dropout = nn.Dropout(dropout)
        self.head = nn.Linear(POOLED[pooling] * hidden_size, num_classes)

    def pool(self, outputs, mask):
        pooled = masked_pool(outputs, mask)                                # (N, 2H): [mean; max]
        if self.pooling == "concat":
            mean, max_ = pooled.chunk(2, dim=-1)                           # (N, H) each
            return torch.cat([last_output(outputs, mask), max_, mean], dim=-1)  # h_c = [h_T, maxpool(H), meanpool(H)]
        return pooled

    def forward(self, x, mask):
        # x (N, L) token ids, 0 = padding; mask (N, L)
        outputs, _ = self.rnn(self.dropout(self.embedding(x)))        # (N, L, H)
        return self.head(self.dropout(self.pool(outputs, mask)))        # (N, classes) logits


POOLED = {"meanmax": 2, "concat": 3}  # the pooled vector's width in hidden sizes


class LMOutput(NamedTuple):
    logits: torch.Tensor    # (N, L, V)
    hidden: torch.Tensor    # (N, L, H) the last layer's outputs h_t, for TAR
    dropped: torch.Tensor   # (N, L, H) dropout(h_t), what the head reads, for AR


class LanguageModel(nn.Module):
    """Embedding -> recurrent layers -> linear over the vocabulary, stateful as in fastbook ch. 12.

    The hidden state is carried from one batch to the next (detached: backpropagation through
    time is truncated at the batch edge), so the network sees further back than one window;
    reset() clears it at the start of every epoch and of every validation. As in fastbook's
    LMModel7, dropout acts on the last layer's outputs; forward returns them next to the logits
    (LMOutput), undropped and dropped, for the AR and TAR penalties of callbacks.ARTAR. emb_dropout
    > 0 adds dropout on the embedding outputs, AWD-LSTM's input dropout (Merity et al. 2017); its
    DropConnect on the recurrent weights is not here.
    """

    def __init__(self, vocab_size, cell="lstm", emb_size=64, hidden_size=64, num_layers=2, dropout=0.1,
                 stateful=True, out_size=None, emb_dropout=0.0):
        super().__init__()
        self.stateful = stateful  # False: every batch starts from zeros (whole names, not a stream)
        self.emb_dropout = emb_dropout
        self.embedding = nn.Embedding(vocab_size, emb_size)
        self.rnn = CELLS[cell](emb_size, hidden_size, num_layers, batch_first=True)
        self.dropout = nn.Dropout(dropout)
        self.head = nn.Linear(hidden_size, out_size or vocab_size)  # out_size: predict only the commonest ids
        if emb_size == hidden_size and out_size in (None, vocab_size):  # weight tying (Press & Wolf 2017): a word's input and output vectors are one
            self.head.weight = self.embedding.weight
        self.state = None

    def reset(self):
        self.state = None

    def forward(self, x, state=None):
        # x (N, L) token ids -> LMOutput: logits (N, L, V), h and dropout(h) (N, L, H); starts from
        # `state` if given, else from self.state (stateful) or zeros, and keeps the final state in
        # self.state for the next call
        state = state if state is not None else self.state if self.stateful else None
        e = self.embedding(x)                                                                       # (N, L, E)
        if self.emb_dropout:  # only then: a model without it draws the same random numbers as before
            e = F.dropout(e, self.emb_dropout, self.training)
        h, state = self.rnn(e, state)                                                               # (N, L, H)
        self.state = tuple(s.detach() for s in state) if isinstance(state, tuple) else state.detach()
        dropped = self.dropout(h)
        return LMOutput(self.head(dropped), h, dropped)


class MLPLanguageModel(nn.Module):
    """Bengio, Ducharme, Vincent & Jauvin (2003), section 2: the previous n tokens' feature
    vectors, concatenated, through one tanh layer (makemore part 2 is this model on names).

        x = (C(w_{t-n}), ..., C(w_{t-1}))           (n m)  oldest first; the paper lists them newest
        y = b + W x + U tanh(d + H x)               (V)    first, which only permutes H's and W's columns;
        P(w_t | context) = softmax(y)                      W, the direct connections, optional
    """

    def __init__(self, vocab_size, context=3, emb_size=10, hidden_size=200, direct=False):
        super().__init__()
        self.context = context
        self.C = nn.Embedding(vocab_size, emb_size)                          # C: one m-vector per token
        self.H = nn.Linear(context * emb_size, hidden_size)                  # H and d
        self.U = nn.Linear(hidden_size, vocab_size)                          # U and b
        self.W = nn.Linear(context * emb_size, vocab_size, bias=False) if direct else None

    def forward(self, x):
        # x (N, n): the n previous tokens, oldest first -> logits (N, V)
        x = rearrange(self.C(x), "N n m -> N (n m)")                         # x = (C(w_{t-n}), ..., C(w_{t-1}))
        y = self.U(torch.tanh(self.H(x)))                                    # y = b + U tanh(d + H x)
        return y if self.W is None else y + self.W(x)                        # ... + W x


def is_mlp(config):
    """Bengio's MLP is configured by its window (`context`); checkpoints from before --model
    also said cell='mlp'."""
    return "context" in config


def build_model(task, config):
    """The model of a task (imdb: the classifier; the others: a language model) from its config,
    the constructor's keyword arguments as checkpoints store them."""
    if task == "imdb":
        return SentimentClassifier(**config)
    if is_mlp(config):
        return MLPLanguageModel(**{k: v for k, v in config.items() if k != "cell"})
    return LanguageModel(**config)
