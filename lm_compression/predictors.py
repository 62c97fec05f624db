"""The predictors that drive the coder, behind the calls the codec needs: `freqs(inputs, past)`, the
next symbol's cumulative integer frequencies (a (B, V + 1) int64 tensor on the predictor's device);
the model's identity (`name`, `digest`); and `setting()`, what its results depend on.

`IntByteLM` (the byte model through the integer path of intmodel.py, the default), `ByteLM` (the byte
model in float, `--float`) and `TokenLM` (a Hugging Face causal LM, float); `load_predictor` reads
what `--model` or `--pretrained` names.
"""
import hashlib
import sys
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from coder import quantize
from intmodel import VERSION as INT_VERSION, IntByteTransformer, frequencies
from weights import PRETRAINED, load_byte_model, load_pretrained


def digest(module):
    """The model's identity in the container: sha256 over its parameter names, shapes and bytes."""
    h = hashlib.sha256()
    for name, t in sorted(module.state_dict().items()):
        h.update(name.encode())
        h.update(str(tuple(t.shape)).encode())
        h.update(t.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes())
    return h.digest()[:16]


def float_frequencies(logits):
    """(B, V) logits -> (B, V + 1) cumulative integer frequencies: softmax in float32, then float64 on
    the CPU for `coder.quantize`. Exact only where the logits are: the same device, dtype, threads
    and library versions (what `float_setting` records)."""
    probs = F.softmax(logits.float(), -1).double().cpu().numpy()
    return torch.from_numpy(np.stack([quantize(p) for p in probs]))


def float_setting(device, dtype):
    """What a float predictor's results depend on, as the container records it."""
    where = f"cuda ({torch.cuda.get_device_name(device)})" if str(device).startswith("cuda") else str(device)
    return {"path": "float", "device": where, "dtype": str(dtype).removeprefix("torch."),
            "threads": str(torch.get_num_threads()), "torch": torch.__version__}


class ByteLM:
    """A byte model as a float predictor: each chunk of `context` bytes starts from BOS."""
    kind, inference = "bytes", "float"

    def __init__(self, net, name, device):
        self.net, self.name, self.device = net.to(device).eval(), name, device
        self.context, self.vocab = net.cfg.context, 256
        self.cache_bytes = 2 * net.cfg.n_layer * net.cfg.context * net.cfg.n_embd * 4  # a chunk's float32 KV cache
        self.digest = digest(net)

    def setting(self):
        return float_setting(self.device, next(self.net.parameters()).dtype)

    @torch.no_grad()
    def freqs(self, inputs, past=None):
        """inputs (B,) the last symbols of B chunks -> (B, 257) cumulative next-byte frequencies, new cache."""
        logits, past = self.net(torch.as_tensor(inputs, device=self.device).view(-1, 1), past)
        return float_frequencies(logits[:, -1]), past


class IntByteLM:
    """A byte model through the integer-only path (intmodel.py), on any device: the same frequencies on
    every machine, device, thread count and batch size."""
    kind, inference = "bytes", "integer"

    def __init__(self, net, name, device="cpu"):
        try:
            self.int_net = IntByteTransformer(net, device=device)
        except ValueError as e:
            raise SystemExit(f"lm_compression: {name}: {e}; compress with --float")
        self.name, self.device, self.context, self.vocab = name, device, net.cfg.context, 256
        self.cache_bytes = 2 * net.cfg.n_layer * net.cfg.context * net.cfg.n_embd * 8  # a chunk's float64 KV cache
        self.digest = self.int_net.digest()

    def setting(self):
        return {"path": "integer", "version": str(INT_VERSION), "weights": f"int{self.int_net.bits}"}

    def freqs(self, inputs, past=None):
        logits, past = self.int_net.forward(torch.as_tensor(inputs, device=self.device).view(-1, 1), past)
        return frequencies(logits[:, -1]), past

    def shares(self, x, y):
        """x, y (B, T): the inputs (BOS, then the bytes) and the bytes -> (B, T, 3) int64 on the CPU: each
        byte's (cum[y], cum[y + 1], total) from one full pass, the same integers `freqs` gives position by
        position (the integer path does not depend on the KV cache)."""
        logits, _ = self.int_net.forward(x.to(self.device))
        cum = frequencies(logits.flatten(0, 1))                             # (B T, 257)
        y = y.to(self.device).reshape(-1, 1)
        return torch.cat([cum.gather(1, y), cum.gather(1, y + 1), cum[:, -1:]], 1).view(*x.shape, 3).cpu()


class TokenLM:
    """A Hugging Face causal LM as a float predictor over its tokens, one chunk at a time (batch 1).
    `tokenize` returns None for bytes the tokenizer cannot give back exactly."""
    kind, inference = "tokens", "float"

    def __init__(self, net, tokenizer, name, device, context=2048):
        self.net, self.tokenizer, self.name, self.device = net.to(device).eval(), tokenizer, name, device
        self.context = context                       # bytes per chunk, the paper's 2048
        self.bos = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.eos_token_id
        self.vocab = net.get_output_embeddings().weight.shape[0]
        self.digest = digest(net)

    def tokenize(self, data):
        try:
            text = data.decode("utf-8")
        except UnicodeDecodeError:
            return None
        ids = self.tokenizer.encode(text, add_special_tokens=False)
        return ids if self.detokenize(ids) == data and all(i < self.vocab for i in ids) else None

    def detokenize(self, ids):
        return self.tokenizer.decode(ids, skip_special_tokens=False, clean_up_tokenization_spaces=False).encode("utf-8")

    def setting(self):
        return float_setting(self.device, self.net.dtype)

    @torch.no_grad()
    def freqs(self, inputs, past=None):
        out = self.net(input_ids=torch.as_tensor(inputs, device=self.device).view(1, 1), cache=past, use_cache=True)
        return float_frequencies(out.logits[:, -1]), out.cache


def transformers():
    """The transformers package. A torchvision built for another torch (the CUDA wheel next to a CPU
    torch, say) fails on import and takes every transformers model down with it, though only image
    code uses it: such a torchvision is hidden first."""
    try:
        import torchvision  # noqa: F401
    except Exception:
        sys.modules["torchvision"] = None
    import transformers as tf
    return tf


def looks_like_a_path(spec):
    """A Hugging Face repo id is `name` or `org/name`; anything else (a file suffix, a leading / . ~, more
    than one /) is meant as a path."""
    return (Path(spec).suffix in {".pt", ".pth", ".ckpt", ".gguf", ".bin", ".safetensors"}
            or spec.startswith(("/", ".", "~")) or spec.count("/") > 1 or "\\" in spec)


def load_predictor(spec, device, context=2048, integer=True):
    """--model: a byte-model checkpoint or the shipped one (`PRETRAINED`), through the integer path unless
    `integer` is False; a .gguf file, or a Hugging Face name or local folder (float)."""
    if spec == PRETRAINED:                                           # --pretrained: the shipped byte model
        net, _ = load_pretrained()
        return IntByteLM(net, spec, device) if integer else ByteLM(net, spec, device)
    path = Path(spec)
    if not path.exists() and looks_like_a_path(spec):
        raise SystemExit(f"lm_compression: --model {spec}: no such file or folder (a byte-model checkpoint, a .gguf "
                         f"file or a model folder must exist; a Hugging Face name looks like org/name)")
    if path.is_file() and path.suffix != ".gguf":
        loaded = load_byte_model(path)
        if loaded is None:
            raise SystemExit(f"lm_compression: {spec} is not a byte-model checkpoint of this folder "
                             f"(write one with: python lm_compression/main.py train --data TEXT --out CKPT)")
        return IntByteLM(loaded[0], spec, device) if integer else ByteLM(loaded[0], spec, device)
    try:
        tf = transformers()
        kw = {"gguf_file": path.name} if path.suffix == ".gguf" else {}
        where = str(path.parent) if path.suffix == ".gguf" else spec
        tokenizer = tf.AutoTokenizer.from_pretrained(where, **kw)
        net = tf.AutoModelForCausalLM.from_pretrained(where, dtype=torch.float32, **kw)
    except Exception as e:
        reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise SystemExit(f"lm_compression: cannot load --model {spec} ({reason[:160]}); pass a byte-model "
                         f"checkpoint (python lm_compression/main.py train ...), a local model folder, a .gguf "
                         f"file, or a Hugging Face name with a network")
    return TokenLM(net, tokenizer, spec, device, context)
