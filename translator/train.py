"""Train the translator: pairs -> split -> shared BPE -> batches, then the loop with the paper's
warmup schedule, validation loss and BLEU, and atomic checkpoints. Several GPUs: launch with
torchrun, and DistributedDataParallel averages the gradients; rank 0 alone logs and checkpoints."""
import csv
import json
import math
import os
import platform
import resource
import statistics
import time
from contextlib import nullcontext
from dataclasses import asdict
from pathlib import Path

import sacrebleu
import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel as DDP
from tqdm import tqdm

from data import (BOS, EOS, PAD, Batches, encode, eval_batches, find_zip, first_sentences, group, load_tokenizer,
                  read_pairs, split_pairs, train_tokenizer)
from model import Config, Transformer, num_params, translate_ids
from pretrained import load_pretrained

FOLDER = "translator"  # stamped into checkpoints, so that another folder's checkpoint is refused
QUICK_OUT_DIR = "runs/translator-quick"  # the one place a fresh (--quick) run may overwrite a checkpoint
# Dense bf16 peak FLOP/s of the GPUs whose MFU --benchmark reports (by a substring of the device name).
PEAK_FLOPS = {"H100": 989e12, "H200": 989e12, "A100": 312e12, "L4": 121e12, "RTX 4090": 165e12}
LOG_FIELDS = ["step", "epoch", "train_loss", "val_loss", "val_bleu", "lr", "tokens_per_s", "elapsed_s"]


def resolve_device(name):
    if name == "auto":
        return "cuda" if torch.cuda.is_available() else "mps" if torch.backends.mps.is_available() else "cpu"
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise SystemExit(f"translator: --device {name}, but CUDA is not available here (try --device cpu)")
    if name == "mps" and not torch.backends.mps.is_available():
        raise SystemExit("translator: --device mps, but MPS is not available here (try --device cpu)")
    return name


def load_checkpoint(path, device="cpu"):
    if not path.is_file():
        raise SystemExit(f"translator: no checkpoint at {path}; train first, or pass the --out-dir of a run")
    try:
        ckpt = torch.load(path, map_location=device, weights_only=True)
    except Exception as e:
        raise SystemExit(f"translator: {path} is not a readable checkpoint ({type(e).__name__})")
    folder = ckpt.get("folder") if isinstance(ckpt, dict) else None
    if folder != FOLDER:
        raise SystemExit(f"translator: {path} is a checkpoint of {folder or 'something else'}, not of {FOLDER}/")
    return ckpt


def load_model(path, device, average=False):
    """The model (in eval mode), tokenizer and checkpoint of a run; with average, the model's weights are the
    mean of the run's kept weights-STEP.pt (--keep-last)."""
    ckpt = load_checkpoint(Path(path), device)
    model = Transformer(Config(**ckpt["config"])).to(device)
    model.load_state_dict(average_weights(kept_weights(Path(path).parent)) if average else ckpt["model"])
    return model.eval(), load_tokenizer(ckpt["tokenizer"]), ckpt


def kept_weights(run_dir):
    """The weights-STEP.pt files of a run (--keep-last), oldest first."""
    paths = sorted(Path(run_dir).glob("weights-*.pt"))
    if not paths:
        raise SystemExit(f"translator: --average needs the weights-STEP.pt files that --keep-last N keeps, and "
                         f"{run_dir} has none; train with --keep-last N (e.g. 5)")
    return paths


def average_weights(paths):
    """The element-wise mean of the model weights saved at paths: the paper's base models average the last
    5 checkpoints, written at 10-minute intervals (§6.1)."""
    states = [torch.load(p, map_location="cpu", weights_only=True) for p in paths]
    return {k: sum(s[k].float() for s in states) / len(states) for k in states[0]}


def n_params(cfg):
    """Parameters of Transformer(cfg), counted from the config: the shared embedding V d; per encoder layer
    4 attention projections 4(d^2 + d), the FFN 2 d d_ff + d_ff + d and two LayerNorms 4d; per decoder layer
    8(d^2 + d), the FFN and three LayerNorms 6d; with pre-LN, two final LayerNorms 4d."""
    d, f, N = cfg.d_model, cfg.d_ff, cfg.n_layer
    ffn = 2 * d * f + f + d
    return cfg.vocab_size * d + N * (4 * (d * d + d) + ffn + 4 * d) + N * (8 * (d * d + d) + ffn + 6 * d) \
        + (4 * d if cfg.pre_ln else 0)


def training_flops(cfg, B, S, T):
    """Matmul FLOPs of one forward and backward (3 x the forward: the backward computes the gradients of
    both inputs of every matmul) on B pairs padded to S source and T target tokens; LayerNorm, softmax,
    the loss and Adam left out. Forward, 2 FLOPs a multiply-add: per source token and encoder layer,
    the attention projections 8 d^2, the FFN 4 d d_ff and the S x S scores and their weighted sum 4 S d;
    per source token and decoder layer, the cross-attention's keys and values 4 d^2; per target token
    and decoder layer, self-attention's projections 8 d^2 and T x T scores 4 T d (all of them computed,
    then masked), cross-attention's queries and output 4 d^2 and T x S scores 4 S d, the FFN 4 d d_ff;
    per target token, the output layer 2 d V. (The weights' part is 6 N per token, as for any net.)"""
    d, f, N, V = cfg.d_model, cfg.d_ff, cfg.n_layer, cfg.vocab_size
    per_src = N * (8 * d * d + 4 * d * f + 4 * S * d) + N * 4 * d * d
    per_tgt = N * (12 * d * d + 4 * T * d + 4 * S * d + 4 * d * f) + 2 * d * V
    return 3 * B * (S * per_src + T * per_tgt)


def check_memory(cfg, batch_size, device):
    """Refuse a model that cannot fit before any data is read or anything allocated: 16 bytes per parameter
    (float32 weights, gradients, Adam's two moments) plus, roughly, the activations one batch of
    batch_size pairs of max_len tokens keeps for the backward pass: per token about 24 d + 4 d_ff numbers
    per layer pair and 3 V for the logits, per head 3 numbers per attention score (encoder, decoder and
    cross-attention); 4 bytes a number, 2 under CUDA's bf16 autocast."""
    B, L, N = batch_size, cfg.max_len, cfg.n_layer
    numbers = B * L * (N * (24 * cfg.d_model + 4 * cfg.d_ff) + 3 * cfg.vocab_size) + 3 * B * cfg.n_head * L * L * 3 * N
    need = 16 * n_params(cfg) + (2 if device.startswith("cuda") else 4) * numbers
    have = (torch.cuda.mem_get_info(device)[1] if device.startswith("cuda")
            else os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE"))
    if need > have:
        raise SystemExit(f"translator: --n-layer {N} --d-model {cfg.d_model} --d-ff {cfg.d_ff} --batch-size {B} "
                         f"--max-len {L} needs about {need / 2**30:,.0f} GiB of memory for weights, optimiser state "
                         f"and activations ({n_params(cfg) / 1e6:,.0f}M parameters), and {device} has "
                         f"{have / 2**30:,.0f} GiB; choose a smaller model or --batch-size")


def all_finite(model, optimizer):
    """True when every weight and every tensor of the optimiser's state is finite (a host sync)."""
    tensors = [*model.parameters(), *(t for st in optimizer.state.values() for t in st.values() if torch.is_tensor(t))]
    return all(bool(torch.isfinite(t).all()) for t in tensors if t.is_floating_point())


def diverged(step, loss, grad_norm, ckpt_path, last_ckpt, when, before="the update"):
    """The one line that stops a run whose loss or gradient became non-finite."""
    kept = f"the last good checkpoint (step {last_ckpt}) is {ckpt_path}" if ckpt_path.exists() else \
        "no checkpoint was written yet"
    return SystemExit(f"translator: the loss or its gradient became non-finite (loss {loss:g}, gradient norm "
                      f"{grad_norm:g}) {when} step {step}; stopping before {before} ({kept}); "
                      f"try a lower --lr")


def save_atomic(obj, path):
    tmp = path.with_suffix(".tmp")
    torch.save(obj, tmp)
    os.replace(tmp, path)  # a crash mid-write leaves the previous checkpoint intact


def get_lr(step, args, d_model):
    """lrate = d_model^-0.5 * min(step^-0.5, step * warmup_steps^-1.5) (§5.3, eq. 3), steps counted
    from 1: linear warmup, then decay with the inverse square root of the step. --lr, when given,
    replaces the peak d_model^-0.5 * warmup_steps^-0.5 reached at the end of the warmup."""
    s, w = step + 1, args.warmup_steps
    scale = args.lr * math.sqrt(w) if args.lr else d_model ** -0.5
    return scale * min(s ** -0.5, s * w ** -1.5)


def translation_scores(hyps, refs):
    """sacreBLEU and chrF of the hypotheses (one per English sentence) against refs (a list of French
    translations per sentence): "bleu" and "chrf" over the pairs, each hypothesis scored once per
    reference (one reference per segment, as Tatoeba test sets are scored); "bleu_multi_ref" with all
    of a sentence's translations as its references at once."""
    pair_hyps, pair_refs = [h for h, r in zip(hyps, refs) for _ in r], [x for r in refs for x in r]
    bleu, chrf = sacrebleu.BLEU(), sacrebleu.CHRF()
    streams = [[r[i] if i < len(r) else None for r in refs] for i in range(max(map(len, refs)))]
    return {"bleu": round(bleu.corpus_score(pair_hyps, [pair_refs]).score, 2),
            "chrf": round(chrf.corpus_score(pair_hyps, [pair_refs]).score, 2),
            # a scorer of its own: reusing `bleu` would turn its signature's nrefs:1 into nrefs:var
            "bleu_multi_ref": round(sacrebleu.BLEU().corpus_score(hyps, streams).score, 2),
            "segments": len(pair_hyps), "sentences": len(hyps),
            "signature": f"{bleu.get_signature()} / {chrf.get_signature()}"}


@torch.no_grad()
def evaluate_loss(model, batches, device, autocast):
    """Mean cross-entropy (nats per target token, label smoothing included) over the batches."""
    model.eval()
    total, n = 0.0, 0
    for src, tgt_in, tgt_out in batches:
        with autocast:
            _, loss = model(src.to(device), tgt_in.to(device), tgt_out.to(device))
        tokens = int((tgt_out != PAD).sum())
        total, n = total + loss.item() * tokens, n + tokens
    model.train()
    return total / n


def valid_bleu(model, tok, sources, refs):
    """BLEU of greedy translations of the validation sentences (see translation_scores)."""
    model.eval()
    hyps = [tok.decode(ids) for ids in translate_ids(model, sources)]
    model.train()
    return translation_scores(hyps, refs)["bleu"]


def open_log(path, resume_step):
    """CSV of the run; on resume, rows past the checkpoint (lost work) and torn rows are dropped first. The kept rows
    replace the log in one rename: a run stopped at any moment leaves the old log or the new one, never an empty one."""
    rows = []
    if resume_step and path.is_file():
        with open(path, errors="replace") as f:
            rows = [r for r in csv.DictReader(f) if (r["step"] or "").isdigit() and int(r["step"]) <= resume_step]
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=LOG_FIELDS)
        writer.writeheader()
        writer.writerows(rows)
    os.replace(tmp, path)
    f = open(path, "a", newline="")
    return f, csv.DictWriter(f, fieldnames=LOG_FIELDS)


def prepare_data(args, saved_tokenizer=None, max_len=None):
    """The training pairs as token lists (those that fit in max_len, default --max-len), the validation
    pairs, and the tokenizer: trained here on the training sentences of both languages unless saved."""
    max_len = max_len or args.max_len
    pairs, sha = read_pairs(find_zip(args.data_dir))
    splits = split_pairs(pairs)
    train_pairs = splits["train"][:args.max_pairs or None]
    valid_pairs = first_sentences(splits["valid"], args.max_eval)
    if saved_tokenizer:
        tok = load_tokenizer(saved_tokenizer)
    else:
        tok = train_tokenizer(sorted({s for pair in train_pairs for s in pair}), args.vocab_size)
    src, tgt = encode(tok, [en for en, _ in train_pairs]), encode(tok, [fr for _, fr in train_pairs])
    keep = [i for i in range(len(src)) if max(len(src[i]), len(tgt[i])) < max_len]  # room for EOS / BOS
    data = {"sha256": sha, "train_src": [src[i] for i in keep], "train_tgt": [tgt[i] for i in keep],
            "dropped": len(src) - len(keep), "valid_src": encode(tok, [en for en, _ in valid_pairs]),
            "valid_tgt": encode(tok, [fr for _, fr in valid_pairs]), "valid_groups": group(valid_pairs)}
    if not keep:
        raise SystemExit(f"translator: no training pair fits in --max-len {max_len} tokens")
    return tok, data


def model_config(args, vocab_size):
    return Config(vocab_size=vocab_size, max_len=args.max_len, n_layer=args.n_layer, n_head=args.n_head,
                  d_model=args.d_model, d_ff=args.d_ff, dropout=args.dropout, label_smoothing=args.label_smoothing,
                  pre_ln=args.pre_ln, pad_id=PAD, bos_id=BOS, eos_id=EOS)


def any_rank(flag, ddp):
    """A device flag of this process, or of any process under DDP, on the host (a sync)."""
    if ddp:
        flag = flag.float()
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
    return bool(flag)


def train_step(model, optimizer, micro_batches, args, autocast, ddp, bad, before_update):
    """One optimiser step, as the loop and --benchmark run it: forward and backward of each micro-batch
    (src, tgt_in, tgt_out on the device; the loss divided by their number; under DDP the gradients are
    all-reduced on the last one only), the global gradient-norm clip, before_update(last loss, gradient norm)
    (which may stop the run), then Adam. bad, a bool on the device, is or-ed in place with a non-finite loss or gradient norm
    (no host sync). Returns the micro-batches' losses (detached) and the gradient norm."""
    losses = []
    for i, (src, tgt_in, tgt_out) in enumerate(micro_batches):
        sync = model.no_sync() if ddp and i < len(micro_batches) - 1 else nullcontext()
        with sync:  # DDP: all-reduce the gradients only on the last micro-step
            with autocast:
                _, loss = model(src, tgt_in, tgt_out)
            (loss / len(micro_batches)).backward()
        bad |= ~torch.isfinite(loss.detach())
        losses.append(loss.detach())
    grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), args.grad_clip or math.inf)
    bad |= ~torch.isfinite(grad_norm)
    before_update(losses[-1], grad_norm)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return losses, grad_norm


def start_processes(args):
    """(rank, world size, local rank, device, ddp): one process per GPU under torchrun, else just this one."""
    if int(os.environ.get("WORLD_SIZE", "1")) == 1:
        return 0, 1, 0, resolve_device(args.device), False
    rank, world, local_rank = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"]), int(os.environ["LOCAL_RANK"])
    if args.device == "mps":
        raise SystemExit("translator: torchrun with --device mps is not supported; use cuda or cpu")
    use_cuda = torch.cuda.is_available() and args.device != "cpu"
    device = f"cuda:{local_rank}" if use_cuda else "cpu"  # one GPU per process, by local rank
    if use_cuda:
        torch.cuda.set_device(device)
    dist.init_process_group(backend="nccl" if use_cuda else "gloo")
    return rank, world, local_rank, device, True


def load_start(args, ckpt_path, device, ddp, local_rank):
    """What the run starts from: (checkpoint or None, shipped weights or None, config, tokenizer, data).
    --resume: the checkpoint's config and tokenizer; --pretrained: the shipped model's (fine-tuning); else
    a new model and a BPE trained on the training split. A fresh run never overwrites a checkpoint."""
    ckpt = load_checkpoint(ckpt_path, device) if args.resume else None
    if ckpt is None and ckpt_path.exists() and not (args.quick and args.out_dir == QUICK_OUT_DIR):
        raise SystemExit(f"translator: {ckpt_path} exists; pass --resume to continue it, or another --out-dir")
    shipped = load_pretrained(device) if args.pretrained and not ckpt else None
    start = ckpt or (shipped and {"config": asdict(shipped[0].cfg), "tokenizer": shipped[1].to_str()})
    cfg = Config(**start["config"]) if start else model_config(args, args.vocab_size)
    check_memory(cfg, batch_pairs(args, cfg), device)  # before any data: the BPE has at most --vocab-size tokens
    if ddp and local_rank != 0:
        dist.barrier()  # local rank 0 alone downloads the data, if it has to
    tok, data = prepare_data(args, start and start["tokenizer"], cfg.max_len if start else args.max_len)
    if ddp and local_rank == 0:
        dist.barrier()
    if ckpt and ckpt["data_sha256"] != data["sha256"]:
        raise SystemExit(f"translator: {ckpt_path} was trained on another fra.txt than the one in "
                         f"{args.data_dir}/tatoeba/; --resume needs the same data")
    return ckpt, shipped and shipped[0], cfg if start else model_config(args, tok.get_vocab_size()), tok, data


def build_model(args, cfg, ckpt, shipped, device, rank):
    """The model (the same initial weights on every rank, or the checkpoint's or the shipped ones), Adam
    (§5.3) and the step to start from; a resumed run gets its RNG state back (exact dropout masks)."""
    torch.manual_seed(args.seed)
    model = Transformer(cfg).to(device)
    # Adam with beta_1 = 0.9, beta_2 = 0.98, epsilon = 1e-9 (§5.3)
    optimizer = torch.optim.Adam(model.parameters(), lr=get_lr(0, args, cfg.d_model), betas=(0.9, args.beta2),
                                 eps=1e-9, fused=device.startswith("cuda"))
    torch.manual_seed(args.seed + rank)  # but different dropout masks
    if shipped is not None:  # fine-tuning: the shipped weights, a fresh optimiser and schedule
        model.load_state_dict(shipped.state_dict())
    if not ckpt:
        return model, optimizer, 0
    model.load_state_dict(ckpt["model"])
    optimizer.load_state_dict(ckpt["optimizer"])
    if rank == 0:  # exact resume of the dropout masks (the other ranks draw fresh ones)
        torch.set_rng_state(ckpt["rng"].cpu())
        if device.startswith("cuda") and ckpt["cuda_rng"] is not None:
            torch.cuda.set_rng_state(ckpt["cuda_rng"].cpu())
    return model, optimizer, ckpt["step"]


class Harness:
    """What runs around the loop: on rank 0 the log (csv, progress bar, wandb) and atomic checkpoints,
    never of a non-finite state; on every rank the check that stops a diverged run in one line."""

    def __init__(self, args, raw, optimizer, cfg, tok, data, ckpt, master, ddp, device):
        self.args, self.raw, self.optimizer, self.cfg, self.tok, self.data = args, raw, optimizer, cfg, tok, data
        self.master, self.ddp, self.cuda = master, ddp, device.startswith("cuda")
        self.path = Path(args.out_dir) / "ckpt.pt"
        self.last_ckpt = ckpt["step"] if ckpt else 0
        self.train_time, self.val_loss, self.val_bleu = ((ckpt["train_time"], ckpt["val_loss"], ckpt["val_bleu"])
                                                         if ckpt else (0.0, float("nan"), float("nan")))
        self.bad = torch.zeros((), dtype=torch.bool, device=device)  # a non-finite loss or gradient, on the device
        self.t_start, self.wall_before = time.perf_counter(), ckpt.get("wall_time", 0.0) if ckpt else 0.0
        if master:
            Path(args.out_dir).mkdir(parents=True, exist_ok=True)
            self.log_file, self.log = open_log(Path(args.out_dir) / "log.csv", self.last_ckpt)
            if args.wandb:
                import wandb
                wandb.init(project="papers-translator", config=vars(args), dir=args.out_dir)

    def stop_if_diverged(self, done, logs, loss, grad_norm):
        """Stop before a non-finite update: every step off CUDA, where the check costs no GPU sync; on
        CUDA at each log line, which precedes every checkpoint (and checkpoint() checks the weights)."""
        if (not self.cuda or logs) and any_rank(self.bad, self.ddp):
            when = "at or before" if self.cuda else "at"
            raise diverged(done, loss.item(), grad_norm.item(), self.path, self.last_ckpt, when) if self.master \
                else SystemExit(1)

    def checkpoint(self, step, loss, grad_norm):
        if not all_finite(self.raw, self.optimizer):  # never save a non-finite state
            raise diverged(step, loss.item(), grad_norm.item(), self.path, self.last_ckpt, "at or before", "saving")
        save_atomic({"folder": FOLDER, "model": self.raw.state_dict(), "optimizer": self.optimizer.state_dict(),
                     "step": step, "config": asdict(self.cfg), "tokenizer": self.tok.to_str(), "args": vars(self.args),
                     "data_sha256": self.data["sha256"], "val_loss": self.val_loss, "val_bleu": self.val_bleu,
                     "train_time": self.train_time, "wall_time": self.wall_before + time.perf_counter() - self.t_start,
                     "hardware": hardware(self.raw), "rng": torch.get_rng_state(),
                     "cuda_rng": torch.cuda.get_rng_state() if self.cuda else None}, self.path)
        self.last_ckpt = step
        if self.args.keep_last:  # the model's weights alone, for --average; the last --keep-last of them kept
            save_atomic(self.raw.state_dict(), self.path.parent / f"weights-{step:07d}.pt")
            for old in sorted(self.path.parent.glob("weights-*.pt"))[:-self.args.keep_last]:
                old.unlink()

    def write(self, row, pbar):
        self.log.writerow(row)
        self.log_file.flush()
        pbar.set_postfix(loss=f"{row['train_loss']:.3f}", val=f"{self.val_loss:.3f}", bleu=f"{self.val_bleu:.1f}",
                         lr=f"{row['lr']:.1e}", tok_s=f"{row['tokens_per_s']:,.0f}")
        if self.args.wandb:
            import wandb
            wandb.log(row, step=row["step"])

    def close(self, interrupted):
        if self.master and interrupted:
            print(f"\ninterrupted; the last checkpoint (step {self.last_ckpt}) is {self.path}: continue with --resume"
                  if self.path.exists() else "\ninterrupted before the first checkpoint; nothing was saved")
        if self.master:
            self.log_file.close()
        if self.ddp:
            dist.destroy_process_group()


def hardware(model):
    device = next(model.parameters()).device
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"{os.cpu_count()}-core CPU ({platform.processor() or platform.machine()}), {torch.get_num_threads()} threads"


def train(args):
    rank, world, local_rank, device, ddp = start_processes(args)
    cuda, master = device.startswith("cuda"), rank == 0
    if cuda:
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
    autocast = torch.autocast("cuda", dtype=torch.bfloat16) if cuda else nullcontext()
    ckpt, shipped, cfg, tok, data = load_start(args, Path(args.out_dir) / "ckpt.pt", device, ddp, local_rank)
    batches = Batches(data["train_src"], data["train_tgt"], args.batch_size, args.seed, args.batch_tokens)
    valid = validation_set(args, cfg, tok, data)
    raw, optimizer, step = build_model(args, cfg, ckpt, shipped, device, rank)
    compile_layers(raw, args.compile if args.compile is not None else cuda)
    model = DDP(raw, device_ids=[local_rank] if cuda else None) if ddp else raw
    run = Harness(args, raw, optimizer, cfg, tok, data, ckpt, master, ddp, device)
    if master:
        print(f"{num_params(raw) / 1e6:.2f}M parameters, shared BPE of {cfg.vocab_size:,} tokens, "
              f"{len(data['train_src']):,} train pairs ({data['dropped']} longer than {cfg.max_len - 1} tokens left "
              f"out), {len(data['valid_src']):,} validation pairs, " + (f"batches of at most {args.batch_tokens:,} "
              f"tokens" if args.batch_tokens else f"{args.batch_size:,} pairs") + f" x {args.grad_accum * world} per step "
              f"({batches.per_epoch / args.grad_accum / world:,.0f} steps per epoch) on {world} x {device}"
              + (f", resuming at step {step}" if ckpt else ""))
    quiet = {} if master else {"disable": True}  # on rank 0, TQDM_DISABLE=1 still turns the bar off
    pbar = tqdm(range(step, args.steps), initial=step, total=args.steps, desc="train", dynamic_ncols=True, **quiet)
    t0, losses, tokens, interrupted = time.perf_counter(), [], 0, False
    try:
        for step in pbar:  # the loop: the paper's schedule (eq. 3), a batch, forward, backward, Adam
            lr = get_lr(step, args, cfg.d_model)
            for g in optimizer.param_groups:
                g["lr"] = lr
            micro = [batches((step * args.grad_accum + i) * world + rank) for i in range(args.grad_accum)]
            tokens += sum(int((tgt_out != PAD).sum()) + int((src != PAD).sum()) for src, _, tgt_out in micro)
            done = step + 1
            logs = done % args.log_interval == 0 or done % args.eval_interval == 0 or done == args.steps
            step_losses, grad_norm = train_step(model, optimizer, [[t.to(device) for t in b] for b in micro], args,
                                                autocast, ddp, run.bad, lambda l, g: run.stop_if_diverged(done, logs, l, g))
            losses += step_losses if master else []
            if master and logs:
                dt = time.perf_counter() - t0
                log_step(run, valid, done, losses, tokens * world / dt, dt, lr, grad_norm, batches, world, autocast, pbar)
                losses, tokens, t0 = [], 0, time.perf_counter()
    except KeyboardInterrupt:
        interrupted = True
        raise SystemExit(130)
    finally:
        run.close(interrupted)
    if master:
        print(f"validation: loss {run.val_loss:.4f} nats/token, greedy BLEU {run.val_bleu:.2f} ({len(valid[2])} "
              f"sentences) after {args.steps} steps; {run.train_time:.0f} s training")
        if args.wandb:
            import wandb
            wandb.finish()
    return raw


def log_step(run, valid, done, losses, tokens_per_s, dt, lr, grad_norm, batches, world, autocast, pbar):
    """A log line (the mean training loss since the last one: the only GPU sync between log lines); at
    each --eval-interval and at the end, the validation loss and BLEU, then a checkpoint."""
    args = run.args
    train_loss = torch.stack(losses).mean().item()
    run.train_time += dt
    row = {"step": done, "epoch": round(done * args.grad_accum * world / batches.per_epoch, 3),
           "train_loss": train_loss, "lr": lr, "tokens_per_s": tokens_per_s}
    if done % args.eval_interval == 0 or done == args.steps:
        val_batches, bleu_sources, bleu_refs = valid
        device = next(run.raw.parameters()).device
        row["val_loss"] = run.val_loss = evaluate_loss(run.raw, val_batches, device, autocast)
        row["val_bleu"] = run.val_bleu = valid_bleu(run.raw, run.tok, bleu_sources, bleu_refs)
        run.checkpoint(done, losses[-1], grad_norm)
    row["elapsed_s"] = run.train_time
    run.write(row, pbar)


def validation_set(args, cfg, tok, data):
    """The validation batches (for the loss), and the first --eval-sentences sentences with their references
    (for the BLEU)."""
    groups = data["valid_groups"][:args.eval_sentences]
    sources = [ids[:cfg.max_len - 1] for ids in encode(tok, [en for en, _ in groups])]
    return eval_batches(data["valid_src"], data["valid_tgt"], args.batch_size), sources, [refs for _, refs in groups]


def batch_pairs(args, cfg):
    """The most pairs of max_len tokens a side a training batch can hold (for the memory check)."""
    return max(1, args.batch_tokens // (2 * cfg.max_len)) if args.batch_tokens else args.batch_size


def compile_layers(model, on):
    """torch.compile each encoder and decoder layer in place (the state_dict's keys do not change);
    lengths change from batch to batch, so the shapes are compiled as dynamic."""
    if on:
        for layer in (*model.encoder, *model.decoder):
            layer.compile(dynamic=True)


def benchmark(args):
    """--benchmark: the model, Adam and train_step of training (same autocast, fused Adam and divergence
    check), 3 warm-up steps (1 with --quick), then the median of --benchmark-steps timed optimiser steps.
    Real batches when DIR/tatoeba/fra-eng.zip is there (the BPE is trained first, untimed; nothing is
    downloaded), else random tokens: as many pairs of --max-len tokens a side as a batch can hold. Tokens
    are source + target tokens (padding not counted). Prints one JSON line; writes nothing."""
    device = resolve_device(args.device)
    device_type, cuda = device.split(":")[0], device.startswith("cuda")
    check_memory(model_config(args, args.vocab_size), batch_pairs(args, args), device)
    if cuda:
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
    autocast = torch.autocast("cuda", dtype=torch.bfloat16) if cuda else nullcontext()
    real = (Path(args.data_dir) / "tatoeba" / "fra-eng.zip").is_file()
    if real:
        tok, data = prepare_data(args)
        cfg = model_config(args, tok.get_vocab_size())
        batches = Batches(data["train_src"], data["train_tgt"], args.batch_size, args.seed, args.batch_tokens)
    else:
        cfg, shape = model_config(args, args.vocab_size), (batch_pairs(args, args), args.max_len)
        batches = lambda i: tuple(torch.randint(EOS + 1, cfg.vocab_size, shape) for _ in range(3))
    torch.manual_seed(args.seed)
    model = Transformer(cfg).to(device)
    compiled = args.compile if args.compile is not None else cuda
    compile_layers(model, compiled)
    optimizer = torch.optim.Adam(model.parameters(), lr=get_lr(0, args, cfg.d_model), betas=(0.9, args.beta2),
                                 eps=1e-9, fused=device_type == "cuda")  # as train()
    bad = torch.zeros((), dtype=torch.bool, device=device)

    def check(loss, grad_norm):  # as training: a host sync every step off CUDA, none on CUDA between log lines
        if not cuda and bad:
            raise SystemExit("translator: the loss or its gradient became non-finite in --benchmark; try a lower --lr")

    warmup, times, tokens, flops = 1 if args.quick else 3, [], 0, 0
    for step in range(warmup + args.benchmark_steps):
        if cuda:
            torch.cuda.synchronize(device)
        t0 = time.perf_counter()  # the step as training runs it, fetching its batches included
        micro = [batches(step * args.grad_accum + i) for i in range(args.grad_accum)]
        train_step(model, optimizer, [[t.to(device) for t in b] for b in micro], args, autocast, False, bad, check)
        if cuda:
            torch.cuda.synchronize(device)
        times.append(time.perf_counter() - t0)
        if step >= warmup:  # tokens as training counts them; FLOPs of the padded shapes
            tokens += sum(int((s != PAD).sum()) + int((t != PAD).sum()) for s, _, t in micro)
            flops += sum(training_flops(cfg, s.size(0), s.size(1), t.size(1)) for s, _, t in micro)
    step_s, per_step = statistics.median(times[warmup:]), round(tokens / args.benchmark_steps)
    name = torch.cuda.get_device_name(device) if cuda else ""
    peak = next((v for k, v in PEAK_FLOPS.items() if k in name), None)
    print(json.dumps({
        "folder": FOLDER, "device": f"cuda:{torch.device(device).index or 0} {name}" if cuda else device,
        "torch": torch.__version__, "params": num_params(model), "batch_size": per_step, "unit": "tokens",
        "samples_per_s": per_step / step_s, "step_ms": step_s * 1e3, "flops_per_sample": flops / tokens,
        "tflops": flops / tokens * per_step / step_s / 1e12,
        "mfu": flops / tokens * per_step / step_s / peak if peak else None,
        "peak_mem_mb": (torch.cuda.max_memory_allocated(device) if cuda
                        else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024) / 2**20,
        "compile": compiled, "data": "real" if real else "random"}))
