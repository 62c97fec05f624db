"""From a checkpoint to what a person reads: translations (greedy or beam search, long text in
pieces), sacreBLEU and chrF on the test split, example translations, the cross-attention of a
translated sentence as a heatmap, and the training curves."""
import csv
import json
import re
import sys
import time
from pathlib import Path

import matplotlib
matplotlib.use("Agg")
import matplotlib.pyplot as plt
import torch

from data import find_zip, first_sentences, group, read_pairs, split_pairs
from model import num_params, translate_ids
from pretrained import load_pretrained, write_atomic
from train import load_model, resolve_device, translation_scores

SEED_SENTENCE = "She saw a boy sitting on a bench."
BREAKS = [r"(?<=[.!?;:])\s+", r"(?<=,)\s+", r"\s+"]  # where a long text is cut: sentences, then commas, then words


def fit(tok, text, limit, breaks=BREAKS):
    """text in pieces of at most `limit` tokens, cut at the first of `breaks` that cuts it, neighbouring
    parts packed back together while they fit; between tokens as the last resort."""
    ids = tok.encode(text).ids
    if len(ids) <= limit:
        return [text] if text else []
    for i, pattern in enumerate(breaks):
        parts = [p for p in re.split(pattern, text) if p]
        if len(parts) > 1:
            pieces = [parts[0]]
            for part in parts[1:]:
                joined = f"{pieces[-1]} {part}"
                if len(tok.encode(joined).ids) <= limit:
                    pieces[-1] = joined
                else:
                    pieces.append(part)
            return [q for p in pieces for q in fit(tok, p, limit, breaks[i + 1:])]
    return [tok.decode(ids[j:j + limit]) for j in range(0, len(ids), limit)]


def translate(model, tok, texts, beam=1, alpha=0.6):
    """Translations of the texts and the number of pieces each was translated in: an empty text
    gives "" (0 pieces); one longer than the model's max_len - 1 source tokens is cut by `fit`, and the
    pieces' translations are joined."""
    pieces, owner = [], []
    for i, text in enumerate(texts):
        for piece in fit(tok, text.strip(), model.cfg.max_len - 1):
            pieces.append(piece)
            owner.append(i)
    outputs = translate_ids(model, [tok.encode(p).ids for p in pieces], beam, alpha)
    joined = [[] for _ in texts]
    for i, out in zip(owner, outputs):
        joined[i].append(tok.decode(out))
    return [" ".join(j) for j in joined], [len(j) for j in joined]


def held_out(args):
    """The test split as [(English, [French translations])], its first --max-eval sentences (0: all);
    and the sha256 of the fra.txt it comes from."""
    pairs, sha = read_pairs(find_zip(args.data_dir))
    return group(first_sentences(split_pairs(pairs)["test"], args.max_eval)), sha


def evaluate(args, model, tok, ckpt):
    """sacreBLEU and chrF of greedy decoding and beam search on the test split -> results.json; returns
    the test sentences and each decoder's translations."""
    groups, sha = held_out(args)
    if sha != ckpt["data_sha256"]:
        print(f"translator: note: {args.data_dir}/tatoeba/fra-eng.zip is not the file this model was trained on; "
              f"its test split may hold sentences the model was trained on", file=sys.stderr)
    sources, refs = [en for en, _ in groups], [r for _, r in groups]
    decoders = [("greedy", 1)] + ([(f"beam{args.beam}", args.beam)] if args.beam > 1 else [])
    results = {"test_sentences": len(groups), "test_pairs": sum(map(len, refs)), "alpha": args.alpha,
               "step": ckpt["step"], "train_seconds": round(ckpt["train_time"], 1), "val_bleu": ckpt["val_bleu"],
               "params": num_params(model), "config": ckpt["config"], "device": str(next(model.parameters()).device),
               "data_sha256": sha}
    outputs = {}
    print(f"test split: {len(groups):,} English sentences, {results['test_pairs']:,} pairs")
    for name, beam in decoders:
        t0 = time.perf_counter()
        outputs[name], _ = translate(model, tok, sources, beam, args.alpha)
        results[name] = {**translation_scores(outputs[name], refs), "seconds": round(time.perf_counter() - t0, 1)}
        r = results[name]
        print(f"{name:>8}: BLEU {r['bleu']:.2f}, chrF {r['chrf']:.2f} (BLEU with all references per sentence "
              f"{r['bleu_multi_ref']:.2f}), {r['seconds']:.0f} s")
    print(f"sacreBLEU {results['greedy']['signature']}")
    out = Path(args.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    write_atomic(out / "results.json", json.dumps(results, indent=2, ensure_ascii=False))
    rows = ["\t".join(["english"] + list(outputs) + ["references"])]
    rows += ["\t".join([en] + [outputs[n][i] for n in outputs] + [" | ".join(refs[i])]) for i, en in enumerate(sources)]
    write_atomic(out / "test_translations.tsv", "\n".join(rows) + "\n")
    print(f"wrote {out / 'results.json'} and {out / 'test_translations.tsv'}")
    return groups, outputs


def examples(args, model, tok, groups, outputs, n=9):
    """The seed's sentence and the first n test sentences of five words or more, with every
    decoder's translation and the references -> translations.txt."""
    entries = [(SEED_SENTENCE, {name: translate(model, tok, [SEED_SENTENCE], 1 if name == "greedy" else args.beam,
                                                args.alpha)[0][0] for name in outputs}, [])]
    for i in [i for i, (en, _) in enumerate(groups) if len(en.split()) >= 5][:n]:
        entries.append((groups[i][0], {name: outputs[name][i] for name in outputs}, groups[i][1]))
    text = "\n".join(f"{en}\n" + "".join(f"  {name}: {hyp}\n" for name, hyp in hyps.items())
                     + "".join(f"  reference: {r}\n" for r in refs) for en, hyps, refs in entries)
    write_atomic(Path(args.out_dir) / "translations.txt", text)
    print(text, end="")
    print(f"wrote {Path(args.out_dir) / 'translations.txt'}")


@torch.no_grad()
def cross_attention(model, tok, text, beam, alpha):
    """The source's tokens, the translation's tokens and each decoder layer's cross-attention weights
    averaged over the heads, (layers, T, S), with EOS on both sides. A long text: its first piece."""
    enc = tok.encode(text)
    ids = enc.ids[:model.cfg.max_len - 1]
    out = translate_ids(model, [ids], beam, alpha)[0]
    device = next(model.parameters()).device
    memory, src_mask = model.encode(torch.tensor([ids + [model.cfg.eos_id]], device=device))
    _, cross = model.decode(torch.tensor([[model.cfg.bos_id] + out], device=device), memory, src_mask)
    weights = torch.stack([w[0].mean(0) for w in cross]).float().cpu()  # row i: the step that produced token i
    return [text[a:b] for a, b in enc.offsets[:len(ids)]] + ["</s>"], [tok.decode([i]) for i in out] + ["</s>"], weights


def plot_attention(src, out, weights, path):
    L, T, S = weights.shape
    fig, axes = plt.subplots(1, L, figsize=(max(4.0, 0.45 * S + 1.5) * L, max(3.0, 0.4 * T + 1.5)), squeeze=False)
    for i, ax in enumerate(axes[0]):
        ax.imshow(weights[i], cmap="viridis", vmin=0, vmax=1)
        ax.set_xticks(range(S), [s.strip() or repr(s) for s in src], rotation=90)
        ax.set_yticks(range(T), [s.strip() or repr(s) for s in out])
        ax.set_title(f"decoder layer {i + 1} (mean of the heads)", fontsize=9)
    fig.supxlabel("English (keys)")
    fig.supylabel("French, as generated (queries)")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def plot_curves(log_path, path):
    with open(log_path) as f:
        rows = list(csv.DictReader(f))
    val = [r for r in rows if r["val_loss"]]
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10, 4))
    ax1.plot([int(r["step"]) for r in rows], [float(r["train_loss"]) for r in rows], label="train (batches)")
    ax1.plot([int(r["step"]) for r in val], [float(r["val_loss"]) for r in val], "o-", label="validation")
    ax1.set(xlabel="step", ylabel="cross-entropy, label smoothing 0.1 (nats / token)")
    ax1.legend()
    ax2.plot([int(r["step"]) for r in val], [float(r["val_bleu"]) for r in val], "o-")
    ax2.set(xlabel="step", ylabel="validation BLEU (greedy)")
    for ax in (ax1, ax2):
        ax.grid(alpha=0.3)
    fig.suptitle("translator: English -> French on Tatoeba")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def load(args, pretrained):
    """The model (eval mode), tokenizer and checkpoint: the shipped ones, or --out-dir's."""
    device = resolve_device(args.device)
    return load_pretrained(device) if pretrained else load_model(Path(args.out_dir) / "ckpt.pt", device, args.average)


def report(args, pretrained=False):
    """After training (or with --sample-only): the test scores, examples and figures."""
    model, tok, ckpt = load(args, pretrained)
    groups, outputs = evaluate(args, model, tok, ckpt)
    examples(args, model, tok, groups, outputs)
    fig_dir = Path(args.figures_dir)
    fig_dir.mkdir(parents=True, exist_ok=True)
    src, out, weights = cross_attention(model, tok, args.attention_text, args.beam, args.alpha)
    plot_attention(src, out, weights, fig_dir / "translator_attention.png")
    print(f"wrote {fig_dir / 'translator_attention.png'}")
    if (Path(args.out_dir) / "log.csv").is_file():
        plot_curves(Path(args.out_dir) / "log.csv", fig_dir / "translator_curves.png")
        print(f"wrote {fig_dir / 'translator_curves.png'}")


def evaluate_command(args):
    model, tok, ckpt = load(args, args.pretrained)
    evaluate(args, model, tok, ckpt)


def translate_command(args):
    """TEXT, or every line of stdin: one translation a line (an empty line for an empty line); with
    --figures-dir, TEXT's cross-attention is drawn there."""
    model, tok, _ = load(args, args.pretrained)
    lines = [args.text] if args.text is not None else sys.stdin.buffer.read().decode("utf-8", "replace").splitlines()
    outputs, pieces = translate(model, tok, lines, args.beam, args.alpha)
    for i, n in enumerate(pieces, 1):
        if n > 1:
            print(f"translator: line {i} is longer than the model's {model.cfg.max_len - 1} tokens; "
                  f"translated in {n} pieces", file=sys.stderr)
    for line in outputs:
        print(line)
    if args.draw_translation and args.text is not None:
        Path(args.figures_dir).mkdir(parents=True, exist_ok=True)
        plot_attention(*cross_attention(model, tok, args.text, args.beam, args.alpha),
                       Path(args.figures_dir) / "translator_attention.png")
        print(f"wrote {Path(args.figures_dir) / 'translator_attention.png'}", file=sys.stderr)
