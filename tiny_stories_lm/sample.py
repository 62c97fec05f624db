"""From a checkpoint to what a person reads: stories, tokens, loss curves and attention maps."""
import csv
import json
from pathlib import Path

import matplotlib
matplotlib.use("Agg")
import matplotlib.pyplot as plt
import torch

from data import BPETokenizer, WordTokenizer, load_tokenizer, piece_strings, read_stories, train_tokenizer
from model import Config, Transformer, build_model, generate
from pretrained import load_weights, log_path, pretrained_tokenizer, pretrained_weights, write_atomic
from train import TOKENIZER_CHARS, load_checkpoint, load_model, resolve_device


def tell_stories(args, model, tok):
    """--num-samples stories continuing --prompt, each ending at the end-of-text token (or after
    --max-new-tokens)."""
    prompt = tok.encode(args.prompt)
    if not prompt:
        raise SystemExit("tiny_stories_lm: --prompt is empty; give at least one character")
    torch.manual_seed(args.seed)
    stories = []
    for _ in range(args.num_samples):
        idx = torch.tensor([prompt], device=next(model.parameters()).device)
        out = generate(model, idx, args.max_new_tokens, args.temperature, args.top_k, args.top_p, stop=tok.eot)
        ids = out[0].tolist()
        stories.append(tok.decode(ids[:-1] if ids[-1] == tok.eot else ids) + ("" if ids[-1] == tok.eot else " [...]"))
    return stories


def shipped(args):
    """--pretrained outside training: the commands read the shipped model, not --out-dir's checkpoint."""
    return args.pretrained and (args.command != "train" or args.sample_only)


def load_for_sampling(args):
    """The model (eval mode), tokenizer, config and log.csv of --out-dir's run, or of the shipped --model."""
    device = resolve_device(args.device)
    if shipped(args):
        saved, weights, card = pretrained_weights(args.model)
        model = build_model(Config(**card["config"]))
        load_weights(model, weights, args.model)
        return model.to(device).eval(), load_tokenizer(saved), card["config"], log_path(args.model)
    model, tok, ckpt = load_model(Path(args.out_dir) / "ckpt.pt", device)
    return model, tok, ckpt["config"], Path(args.out_dir) / "log.csv"


def sample(args):
    """Stories, the loss curve and (a Transformer) the attention figures of the run in --out-dir (or of
    the shipped model)."""
    out = Path(args.out_dir)
    model, tok, config, log_csv = load_for_sampling(args)
    stories = tell_stories(args, model, tok)
    text = "".join(f"#### STORY {i} ####\n{s}\n\n" for i, s in enumerate(stories, 1))
    out.mkdir(parents=True, exist_ok=True)
    write_atomic(out / "stories.txt", text)
    print(text, end="")
    print(f"wrote {out / 'stories.txt'}")
    fig_dir = Path(args.figures_dir)
    fig_dir.mkdir(parents=True, exist_ok=True)
    if log_csv is not None and log_csv.is_file():
        path = fig_dir / f"tiny_stories_lm_{config['model']}_loss.png"
        plot_loss(log_csv, path, config["model"])
        print(f"wrote {path}")
    if isinstance(model, Transformer):
        draw_attention(args, model, tok)


def plot_loss(log_path, fig_path, name):
    with open(log_path) as f:
        rows = list(csv.DictReader(f))
    val = [r for r in rows if r["val_loss"]]
    fig, ax = plt.subplots(figsize=(6, 4))
    ax.plot([int(r["step"]) for r in rows], [float(r["train_loss"]) for r in rows], label="train (batches)")
    ax.plot([int(r["step"]) for r in val], [float(r["val_loss"]) for r in val], "o-", label="validation (first --eval-tokens)")
    ax.set(xlabel="step", ylabel="cross-entropy (nats / token)", title=f"TinyStories: {name}")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(fig_path, dpi=120)
    plt.close(fig)


@torch.no_grad()
def attention_weights(model, tok, prompt):
    """The prompt's tokens (as strings) and every layer's attention weights, each (nh, T, T)."""
    ids = tok.encode(prompt)[:model.cfg.block_size]
    weights = []
    model(torch.tensor([ids], device=next(model.parameters()).device), attention=weights)
    return [tok.decode([i]) for i in ids], [w[0].float().cpu() for w in weights]


def attention(args):
    """The attention command: the figures of draw_attention for the run in --out-dir (or the shipped model)."""
    model, tok, _, _ = load_for_sampling(args)
    if not isinstance(model, Transformer):
        raise SystemExit("tiny_stories_lm: the bag model has no attention; pass the --out-dir of a transformer run")
    draw_attention(args, model, tok)


def draw_attention(args, model, tok):
    """A heatmap of every head of --layer over --attention-prompt (PNG), and the same weights as an
    HTML page: hover a token to see where each head looks from it."""
    if not 0 <= args.layer < model.cfg.n_layer:
        raise SystemExit(f"tiny_stories_lm: --layer {args.layer}: this model has layers 0 to {model.cfg.n_layer - 1}")
    tokens, weights = attention_weights(model, tok, args.attention_prompt)
    fig_dir = Path(args.figures_dir)
    fig_dir.mkdir(parents=True, exist_ok=True)
    png = fig_dir / f"tiny_stories_lm_attention_layer{args.layer}.png"
    plot_heads(tokens, weights[args.layer], png, args.layer)
    page = Path(args.out_dir) / "attention.html"
    page.parent.mkdir(parents=True, exist_ok=True)
    write_atomic(page, attention_html(tokens, weights))
    print(f"wrote {png} and {page} (open it in a browser)")


def plot_heads(tokens, w, path, layer):
    nh, T, _ = w.shape
    cols = min(nh, 4)
    rows = (nh + cols - 1) // cols
    size = max(3.0, 0.28 * T)
    fig, axes = plt.subplots(rows, cols, figsize=(size * cols, size * rows), squeeze=False)
    labels = [t.replace("\n", "\\n") for t in tokens]
    for h, ax in enumerate(axes.flat):
        if h >= nh:
            ax.axis("off")
            continue
        ax.imshow(w[h], cmap="viridis", vmin=0, vmax=1)
        ax.set_title(f"layer {layer}, head {h}")
        ax.set_xticks(range(T), labels, rotation=90, fontsize=7)
        ax.set_yticks(range(T), labels, fontsize=7)
    fig.supxlabel("key (attended to)")
    fig.supylabel("query (attending)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


PAGE = """<!doctype html><meta charset="utf-8"><title>attention</title>
<style>body{font:16px sans-serif;margin:2em;max-width:60em}span.t{white-space:pre;padding:2px 0;cursor:pointer}
select{font-size:15px}</style>
<p>Hover a token: the tokens it attends to are shaded by the attention weight of the chosen layer and head.</p>
<p>layer <select id="layer"></select> head <select id="head"></select></p><div id="text"></div>
<script>
const tokens = TOKENS, weights = WEIGHTS;  // weights[layer][head][query][key]
const text = document.getElementById("text"), layer = document.getElementById("layer"), head = document.getElementById("head");
weights.forEach((_, i) => layer.add(new Option(i, i)));
weights[0].forEach((_, i) => head.add(new Option(i, i)));
const spans = tokens.map((t, i) => { const s = document.createElement("span"); s.className = "t";
  s.textContent = t; s.onmouseover = () => show(i); text.appendChild(s); return s; });
function show(q) { const w = weights[layer.value][head.value][q];
  spans.forEach((s, k) => { s.style.background = k == q ? "#fc6" : `rgba(30,100,220,${k <= q ? w[k] : 0})`; }); }
</script>"""


def attention_html(tokens, weights):
    rounded = [[[[round(x, 3) for x in row] for row in head] for head in w.tolist()] for w in weights]
    return PAGE.replace("TOKENS", json.dumps(tokens)).replace("WEIGHTS", json.dumps(rounded))


def show_tokens(args):
    """The tokens of args.text under both tokenizers: a checkpoint's own when --out-dir has one,
    otherwise each trained here on the training stories."""
    saved = {}
    ckpt_path = Path(args.out_dir) / "ckpt.pt"
    if args.pretrained:
        tok = load_tokenizer(pretrained_tokenizer(args.model))
        saved[type(tok)], ckpt_path = tok, Path(f"pretrained/tiny_stories_lm/{args.model}.tokenizer.json")
    elif ckpt_path.is_file():
        tok = load_tokenizer(load_checkpoint(ckpt_path)["tokenizer"])
        saved[type(tok)] = tok
    stories = None
    for cls, kind in ((WordTokenizer, "word"), (BPETokenizer, "bpe")):
        tok = saved.get(cls)
        source = f"from {ckpt_path}"
        if tok is None:
            stories = stories or read_stories(args.data_dir, "train", TOKENIZER_CHARS)
            tok = train_tokenizer(kind, stories, args.vocab_size)
            source = f"trained on {sum(map(len, stories)):,} characters of training stories"
        pieces = piece_strings(tok, args.text)
        ids = tok.encode(args.text)
        name = "word-level" if kind == "word" else "byte-level BPE"
        print(f"{name} tokenizer, vocabulary {len(tok):,} ({source}): {len(ids)} tokens, "
              f"{len(args.text) / max(1, len(ids)):.2f} characters per token")
        print("  " + "|".join(p.replace("\n", "\\n") for p in pieces))
        print("  ids: " + " ".join(map(str, ids)))
