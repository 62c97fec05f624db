"""How good are the samples? FID in the feature space of a small classifier trained on the same
dataset (Inception features mean little on 28x28 greyscale digits and clothes, so MNIST-like
work uses a domain classifier instead), the share of samples that classifier labels with
confidence > 0.9, and the class histogram of the samples (are all ten modes covered?).
Both samplers are measured on the same starting noise: DDPM with all T steps, DDIM with
--sample-steps, with their wall time."""
import json
import os
import time

import matplotlib
matplotlib.use("Agg")
import matplotlib.pyplot as plt
import torch
import torch.nn as nn
import torch.nn.functional as F
from tqdm import tqdm

from data import CLASSES, DATASETS, load_split, to_model_range
from sample import draw, open_run, save_figure
from train import FOLDER, load_checkpoint, save_atomic

CONFIDENT = 0.9


class Classifier(nn.Module):
    """Three conv blocks, global average pooling to 128 features (the FID space), a linear layer to 10 classes."""

    def __init__(self, n_classes=10):
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(1, 32, 3, padding=1), nn.ReLU(), nn.Conv2d(32, 64, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(64, 128, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(128, 128, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten())  # (B, 128)
        self.head = nn.Linear(128, n_classes)

    def forward(self, x):                                       # x (B, 1, H, W) on [-1, 1]
        f = self.features(x)
        return self.head(f), f


@torch.no_grad()
def embed(classifier, x, device, batch_size=500):
    """(class probabilities (N, 10), features (N, 128)) of images on [-1, 1]."""
    out = [classifier(x[i:i + batch_size].to(device)) for i in range(0, len(x), batch_size)]
    return torch.cat([F.softmax(o[0].float(), 1) for o in out]).cpu(), torch.cat([o[1].float() for o in out]).cpu()


def train_classifier(args, device, path):
    """Adam, a few epochs on the training set; kept next to the run (classifier.pt) and reused."""
    images, labels = load_split(args.data_dir, args.dataset, "train")
    x, y = to_model_range(images[:args.train_size or None]), labels[:args.train_size or None]
    torch.manual_seed(args.seed)
    classifier = Classifier().to(device)
    optimizer = torch.optim.Adam(classifier.parameters(), lr=1e-3)
    for epoch in range(args.classifier_epochs):
        order = torch.randperm(len(x))
        for i in tqdm(range(0, len(x), 128), desc=f"classifier epoch {epoch + 1}/{args.classifier_epochs}",
                      leave=False, dynamic_ncols=True):
            idx = order[i:i + 128]
            loss = F.cross_entropy(classifier(x[idx].to(device))[0], y[idx].to(device))
            loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
    classifier.eval()
    test_images, test_labels = load_split(args.data_dir, args.dataset, "test")
    probs, _ = embed(classifier, to_model_range(test_images), device)
    accuracy = (probs.argmax(1) == test_labels).float().mean().item()
    save_atomic({"folder": FOLDER, "kind": "classifier", "dataset": args.dataset, "model": classifier.state_dict(),
                 "test_accuracy": accuracy, "train_images": len(x), "epochs": args.classifier_epochs}, path)
    return classifier, accuracy


def frechet_distance(f_1, f_2):
    """FID = ||mu_1 - mu_2||^2 + tr(S_1 + S_2 - 2 (S_1 S_2)^(1/2)) between Gaussians fitted to two
    feature sets (N, D). tr (S_1 S_2)^(1/2) is the sum of the square roots of the eigenvalues of
    S_1 S_2, which are real and >= 0 (S_1 S_2 is similar to the PSD S_1^(1/2) S_2 S_1^(1/2))."""
    f_1, f_2 = f_1.double(), f_2.double()
    mu_1, mu_2 = f_1.mean(0), f_2.mean(0)
    s_1, s_2 = torch.cov(f_1.T), torch.cov(f_2.T)
    sqrt_eigs = torch.linalg.eigvals(s_1 @ s_2).real.clamp(min=0).sqrt()
    return ((mu_1 - mu_2) ** 2).sum().item() + (s_1.trace() + s_2.trace() - 2 * sqrt_eigs.sum()).item()


def quality(probs, feats, ref_feats):
    """FID against the reference features, confident share, class histogram."""
    return {"fid": frechet_distance(feats, ref_feats),
            "confident_share": (probs.max(1).values > CONFIDENT).float().mean().item(),
            "class_histogram": torch.bincount(probs.argmax(1), minlength=probs.shape[1]).tolist()}


def plot_histograms(results, dataset, path):
    names = list(results)
    fig, ax = plt.subplots(figsize=(7, 3.5))
    width = 0.8 / len(names)
    for k, name in enumerate(names):
        counts = torch.tensor(results[name]["class_histogram"], dtype=torch.float)
        ax.bar(torch.arange(10) + (k - (len(names) - 1) / 2) * width, counts / counts.sum(), width, label=name)
    ax.set_xticks(range(10), CLASSES[dataset], fontsize=8)
    ax.set(ylabel="share of images", title=f"classes the {DATASETS[dataset]} classifier assigns (mode coverage)")
    ax.legend(fontsize=8)
    save_figure(fig, path)


def evaluate(args):
    device, run, fig_dir, model, diffusion, ckpt = open_run(args)
    run.mkdir(parents=True, exist_ok=True)                      # with --pretrained, maybe no run folder yet
    clf_path = run / "classifier.pt"
    if clf_path.is_file():
        saved = load_checkpoint(clf_path, device, kind="classifier", dataset=args.dataset)
        classifier = Classifier().to(device)
        classifier.load_state_dict(saved["model"])
        classifier.eval()
        accuracy = saved["test_accuracy"]
    else:
        classifier, accuracy = train_classifier(args, device, clf_path)
    print(f"classifier: {accuracy:.2%} test accuracy on {args.dataset}")

    # Reference: the test set's features. Floor: real training images, as many as the samples.
    test_images, _ = load_split(args.data_dir, args.dataset, "test")
    _, ref = embed(classifier, to_model_range(test_images), device)
    train_images, _ = load_split(args.data_dir, args.dataset, "train")
    real = to_model_range(train_images[torch.randperm(len(train_images), generator=torch.Generator().manual_seed(0))
                                       [:args.n_eval]])
    results = {"real training images": quality(*embed(classifier, real, device), ref) | {"seconds": 0.0}}
    for sampler, steps in (("ddpm", args.T), ("ddim", args.sample_steps)):
        args.sampler = sampler
        t0 = time.perf_counter()
        x = torch.cat([draw(model, diffusion, args, min(args.eval_batch, args.n_eval - i), args.seed + 10 + i,
                            device, desc=f"{sampler} {i}/{args.n_eval}")
                       for i in range(0, args.n_eval, args.eval_batch)])
        seconds = time.perf_counter() - t0
        name = f"{sampler.upper()}, {steps} steps" + (f", eta {args.eta:g}" if sampler == "ddim" else "")
        results[name] = quality(*embed(classifier, x, device), ref) | {"seconds": seconds}

    metrics = {"dataset": args.dataset, "n_samples": args.n_eval, "reference": f"{len(test_images):,} test images",
               "classifier_test_accuracy": accuracy, "epochs": ckpt["epoch"], "device": device, "results": results}
    tmp = run / f"eval.json.tmp{os.getpid()}"
    tmp.write_text(json.dumps(metrics, indent=2) + "\n")
    os.replace(tmp, run / "eval.json")
    fig_dir.mkdir(parents=True, exist_ok=True)
    plot_histograms(results, args.dataset, fig_dir / f"ddpm_{args.dataset}_classes.png")
    print(f"{args.n_eval:,} samples each, FID in the classifier's 128-d feature space against "
          f"{len(test_images):,} {args.dataset} test images:")
    print(f"{'':28s} {'FID':>8s} {'confident':>10s} {'seconds':>9s}  classes")
    for name, r in results.items():
        print(f"{name:28s} {r['fid']:8.2f} {r['confident_share']:10.1%} {r['seconds']:9.1f}  {r['class_histogram']}")
    ddpm, ddim = (results[k]["seconds"] for k in list(results)[1:])
    print(f"DDIM samples {ddpm / ddim:.1f}x faster than DDPM")
    print(f"wrote {run / 'eval.json'}, {fig_dir / f'ddpm_{args.dataset}_classes.png'}")
    return metrics
