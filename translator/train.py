"""Train the translator: pairs -> split -> shared BPE -> batches, then the loop with the paper's
warmup schedule, validation loss and BLEU, and atomic checkpoints. Several GPUs: launch with
torchrun, and DistributedDataParallel averages the gradients; rank 0 alone logs and checkpoints."""
import csv
import json
import math
import os
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


def load_model(path, device):
    """The model (in eval mode), tokenizer and checkpoint of a run."""
    ckpt = load_checkpoint(Path(path), device)
    model = Transformer(Config(**ckpt["config"])).to(device)
    model.load_state_dict(ckpt["model"])
    return model.eval(), load_tokenizer(ckpt["tokenizer"]), ckpt


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
    """CSV of the run; on resume, rows past the checkpoint (lost work) are dropped first."""
    rows = []
    if resume_step and path.is_file():
        with open(path) as f:
            rows = [r for r in csv.DictReader(f) if int(r["step"]) <= resume_step]
    f = open(path, "w", newline="")
    writer = csv.DictWriter(f, fieldnames=LOG_FIELDS)
    writer.writeheader()
    writer.writerows(rows)
    return f, writer


def prepare_data(args, saved_tokenizer=None):
    """The training pairs as token lists (those that fit in max_len), the validation pairs, and the
    tokenizer: trained here on the training sentences of both languages unless saved."""
    pairs, sha = read_pairs(find_zip(args.data_dir))
    splits = split_pairs(pairs)
    train_pairs = splits["train"][:args.max_pairs or None]
    valid_pairs = first_sentences(splits["valid"], args.max_eval)
    if saved_tokenizer:
        tok = load_tokenizer(saved_tokenizer)
    else:
        tok = train_tokenizer(sorted({s for pair in train_pairs for s in pair}), args.vocab_size)
    src, tgt = encode(tok, [en for en, _ in train_pairs]), encode(tok, [fr for _, fr in train_pairs])
    keep = [i for i in range(len(src)) if max(len(src[i]), len(tgt[i])) < args.max_len]  # room for EOS / BOS
    data = {"sha256": sha, "train_src": [src[i] for i in keep], "train_tgt": [tgt[i] for i in keep],
            "dropped": len(src) - len(keep), "valid_src": encode(tok, [en for en, _ in valid_pairs]),
            "valid_tgt": encode(tok, [fr for _, fr in valid_pairs]), "valid_groups": group(valid_pairs)}
    if not keep:
        raise SystemExit(f"translator: no training pair fits in --max-len {args.max_len} tokens")
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


def train(args):
    # ---- processes and device: one per GPU under torchrun, else just this one
    ddp = int(os.environ.get("WORLD_SIZE", "1")) > 1
    if ddp:
        rank, world, local_rank = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"]), int(os.environ["LOCAL_RANK"])
        if args.device == "mps":
            raise SystemExit("translator: torchrun with --device mps is not supported; use cuda or cpu")
        use_cuda = torch.cuda.is_available() and args.device != "cpu"
        device = f"cuda:{local_rank}" if use_cuda else "cpu"  # one GPU per process, by local rank
        if use_cuda:
            torch.cuda.set_device(device)
        dist.init_process_group(backend="nccl" if use_cuda else "gloo")
    else:
        rank, world, local_rank, device = 0, 1, 0, resolve_device(args.device)
    master = rank == 0
    device_type = device.split(":")[0]
    if device_type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
    autocast = torch.autocast("cuda", dtype=torch.bfloat16) if device_type == "cuda" else nullcontext()

    # ---- data, tokenizer (the checkpoint's when resuming) and model
    out = Path(args.out_dir)
    ckpt_path = out / "ckpt.pt"
    ckpt = load_checkpoint(ckpt_path, device) if args.resume else None
    if ckpt is None and ckpt_path.exists() and not (args.quick and args.out_dir == QUICK_OUT_DIR):
        raise SystemExit(f"translator: {ckpt_path} exists; pass --resume to continue it, or another --out-dir")
    cfg = Config(**ckpt["config"]) if ckpt else model_config(args, args.vocab_size)
    check_memory(cfg, args.batch_size, device)  # before any data: the BPE has at most --vocab-size tokens
    if ddp and local_rank != 0:
        dist.barrier()  # local rank 0 alone downloads the data, if it has to
    tok, data = prepare_data(args, ckpt and ckpt["tokenizer"])
    if ddp and local_rank == 0:
        dist.barrier()
    if ckpt and ckpt["data_sha256"] != data["sha256"]:
        raise SystemExit(f"translator: {ckpt_path} was trained on another fra.txt than the one in "
                         f"{args.data_dir}/tatoeba/; --resume needs the same data")
    cfg = cfg if ckpt else model_config(args, tok.get_vocab_size())
    batches = Batches(data["train_src"], data["train_tgt"], args.batch_size, args.seed)
    val_batches = eval_batches(data["valid_src"], data["valid_tgt"], args.batch_size)
    bleu_groups = data["valid_groups"][:args.eval_sentences]
    bleu_sources = [ids[:cfg.max_len - 1] for ids in encode(tok, [en for en, _ in bleu_groups])]
    bleu_refs = [refs for _, refs in bleu_groups]

    torch.manual_seed(args.seed)  # the same initial weights on every rank
    model = Transformer(cfg).to(device)
    # Adam with beta_1 = 0.9, beta_2 = 0.98, epsilon = 1e-9 (§5.3)
    optimizer = torch.optim.Adam(model.parameters(), lr=get_lr(0, args, cfg.d_model), betas=(0.9, args.beta2),
                                 eps=1e-9, fused=device_type == "cuda")
    torch.manual_seed(args.seed + rank)  # but different dropout masks
    step = 0
    if ckpt:
        model.load_state_dict(ckpt["model"])
        optimizer.load_state_dict(ckpt["optimizer"])
        step = ckpt["step"]
        if master:  # exact resume of the dropout masks (the other ranks draw fresh ones)
            torch.set_rng_state(ckpt["rng"].cpu())
            if device_type == "cuda" and ckpt["cuda_rng"] is not None:
                torch.cuda.set_rng_state(ckpt["cuda_rng"].cpu())
    raw = model
    if ddp:
        model = DDP(model, device_ids=[local_rank] if device_type == "cuda" else None)

    pairs_per_step = args.batch_size * args.grad_accum * world
    if master:
        out.mkdir(parents=True, exist_ok=True)
        print(f"{num_params(raw) / 1e6:.2f}M parameters, shared BPE of {cfg.vocab_size:,} tokens, "
              f"{len(data['train_src']):,} train pairs ({data['dropped']} longer than {cfg.max_len - 1} tokens left "
              f"out), {len(data['valid_src']):,} validation pairs, {pairs_per_step:,} pairs per step "
              f"({batches.per_epoch / args.grad_accum / world:,.0f} steps per epoch) on {world} x {device}"
              + (f", resuming at step {step}" if ckpt else ""))
        log_file, log = open_log(out / "log.csv", step)
        if args.wandb:
            import wandb
            wandb.init(project="papers-translator", config=vars(args), dir=out)

    def checkpoint(step, val_loss, val_bleu):
        if not all_finite(raw, optimizer):  # never save a non-finite state
            raise diverged(step, loss.item(), grad_norm.item(), ckpt_path, last_ckpt, "at or before", "saving")
        save_atomic({"folder": FOLDER, "model": raw.state_dict(), "optimizer": optimizer.state_dict(),
                     "step": step, "config": asdict(cfg), "tokenizer": tok.to_str(), "args": vars(args),
                     "data_sha256": data["sha256"], "val_loss": val_loss, "val_bleu": val_bleu,
                     "train_time": train_time, "rng": torch.get_rng_state(),
                     "cuda_rng": torch.cuda.get_rng_state() if device_type == "cuda" else None}, ckpt_path)

    def stop_if_diverged(done, logs, loss, grad_norm):
        # Stop before a non-finite update: every step off CUDA, where the check costs no GPU sync; on
        # CUDA at each log line, which precedes every checkpoint (and checkpoint() checks the weights).
        if (device_type != "cuda" or logs) and any_rank(bad, ddp):
            when = "at" if device_type != "cuda" else "at or before"
            raise diverged(done, loss.item(), grad_norm.item(), ckpt_path, last_ckpt, when) if master \
                else SystemExit(1)

    # ---- the loop
    quiet = {} if master else {"disable": True}  # on rank 0, TQDM_DISABLE=1 still turns the bar off
    pbar = tqdm(range(step, args.steps), initial=step, total=args.steps, desc="train", dynamic_ncols=True, **quiet)
    t0, losses, tokens, last_ckpt = time.perf_counter(), [], 0, step
    bad = torch.zeros((), dtype=torch.bool, device=device)  # a non-finite loss or gradient so far, kept on the device
    train_time, val_loss, val_bleu = ((ckpt["train_time"], ckpt["val_loss"], ckpt["val_bleu"]) if ckpt
                                      else (0.0, float("nan"), float("nan")))
    try:
        for step in pbar:
            lr = get_lr(step, args, cfg.d_model)
            for g in optimizer.param_groups:
                g["lr"] = lr
            micro = [batches((step * args.grad_accum + i) * world + rank) for i in range(args.grad_accum)]
            tokens += sum(int((tgt_out != PAD).sum()) + int((src != PAD).sum()) for src, _, tgt_out in micro)
            done = step + 1
            logs = done % args.log_interval == 0 or done % args.eval_interval == 0 or done == args.steps
            step_losses, grad_norm = train_step(model, optimizer, [[t.to(device) for t in b] for b in micro], args,
                                                autocast, ddp, bad, lambda l, g: stop_if_diverged(done, logs, l, g))
            loss = step_losses[-1]
            if master:
                losses += step_losses

            if master and logs:
                train_loss = torch.stack(losses).mean().item()  # syncs with the GPU only here
                dt = time.perf_counter() - t0
                train_time += dt
                row = {"step": done, "epoch": round(done * args.grad_accum * world / batches.per_epoch, 3),
                       "train_loss": train_loss, "lr": lr, "tokens_per_s": tokens * world / dt}
                losses, tokens = [], 0
                if done % args.eval_interval == 0 or done == args.steps:
                    row["val_loss"] = val_loss = evaluate_loss(raw, val_batches, device, autocast)
                    row["val_bleu"] = val_bleu = valid_bleu(raw, tok, bleu_sources, bleu_refs)
                    checkpoint(done, val_loss, val_bleu)
                    last_ckpt = done
                row["elapsed_s"] = train_time
                log.writerow(row)
                log_file.flush()
                pbar.set_postfix(loss=f"{train_loss:.3f}", val=f"{val_loss:.3f}", bleu=f"{val_bleu:.1f}",
                                 lr=f"{lr:.1e}", tok_s=f"{row['tokens_per_s']:,.0f}")
                if args.wandb:
                    wandb.log(row, step=done)
                t0 = time.perf_counter()
    except KeyboardInterrupt:
        if master and ckpt_path.exists():
            print(f"\ninterrupted; the last checkpoint (step {last_ckpt}) is {ckpt_path}: continue with --resume")
        elif master:
            print("\ninterrupted before the first checkpoint; nothing was saved")
        raise SystemExit(130)
    finally:
        if master:
            log_file.close()
        if ddp:
            dist.destroy_process_group()

    if master:
        print(f"validation: loss {val_loss:.4f} nats/token, greedy BLEU {val_bleu:.2f} ({len(bleu_refs)} sentences) "
              f"after {args.steps} steps; {train_time:.0f} s training")
        if args.wandb:
            wandb.finish()
    return raw


def benchmark(args):
    """--benchmark: the model, Adam and train_step of training (same autocast, fused Adam and divergence
    check), 3 warm-up steps (1 with --quick), then the median of --benchmark-steps timed optimiser steps.
    Real batches when DIR/tatoeba/fra-eng.zip is there (the BPE is trained first, untimed; nothing is
    downloaded), else random tokens, --batch-size pairs of --max-len tokens a side. Tokens are source + target tokens (padding not
    counted). Prints one JSON line; writes nothing."""
    device = resolve_device(args.device)
    device_type, cuda = device.split(":")[0], device.startswith("cuda")
    check_memory(model_config(args, args.vocab_size), args.batch_size, device)
    if cuda:
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
    autocast = torch.autocast("cuda", dtype=torch.bfloat16) if cuda else nullcontext()
    real = (Path(args.data_dir) / "tatoeba" / "fra-eng.zip").is_file()
    if real:
        tok, data = prepare_data(args)
        cfg, batches = model_config(args, tok.get_vocab_size()), Batches(data["train_src"], data["train_tgt"],
                                                                         args.batch_size, args.seed)
    else:
        cfg, L = model_config(args, args.vocab_size), args.max_len
        batches = lambda i: tuple(torch.randint(EOS + 1, cfg.vocab_size, (args.batch_size, L)) for _ in range(3))
    torch.manual_seed(args.seed)
    model = Transformer(cfg).to(device)
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
        "compile": False, "data": "real" if real else "random"}))
