"""PPO with the clipped objective (Schulman et al. 2017): train, evaluate greedily, record a GIF.

    python ppo/main.py                          # CartPole-v1 to 500, then images of the agent
    python ppo/main.py --env-id Pendulum-v1     # continuous actions (diagonal Gaussian)
    python ppo/main.py --quick                  # the whole pipeline on CPU in < 60 s
    python ppo/main.py --sample-only --pretrained   # the shipped agent: greedy return, curve and GIF
    python ppo/main.py --benchmark --quick      # time training's iterations: one JSON line, nothing written

Hyperparameters not typed take the --env-id's preset (PRESETS in ppo/main.py; CleanRL's defaults, declared
below, for other ids); any flag given explicitly wins.
"""
import argparse
import math
import re
import sys
from pathlib import Path

import gymnasium as gym

from export import export_pretrained
from pretrained import pretrained_card
from sample import sample
from train import QUICK_OUT_DIR, benchmark, load_checkpoint, train

PRESETS = {
    # Many short rollouts and many epochs (the RL Baselines3 Zoo's tuned CartPole settings).
    "CartPole-v1": dict(num_envs=8, num_steps=32, total_timesteps=150_000, lr=1e-3, update_epochs=20,
                        num_minibatches=1, gamma=0.98, gae_lambda=0.8, ent_coef=0.0),
    # Short horizon (gamma 0.95), normalised observations and rewards, batches of 2048.
    "Pendulum-v1": dict(num_envs=8, num_steps=256, total_timesteps=200_000, lr=3e-4, update_epochs=10,
                        num_minibatches=32, gamma=0.95, gae_lambda=0.95, ent_coef=0.0, normalize=True,
                        solve_return=-300.0),
}
QUICK = dict(total_timesteps=40_000, eval_episodes=3, out_dir=QUICK_OUT_DIR, benchmark_steps=3)
# Flags that --resume and --sample-only do not take from the checkpoint's run.
NOT_RESUMED = {"resume", "sample_only", "quick", "out_dir", "figures_dir", "device", "wandb", "eval_episodes",
               "gif_steps", "total_timesteps", "pretrained", "export_pretrained"}


class Parser(argparse.ArgumentParser):
    def error(self, message):  # one line, no usage block
        self.exit(2, f"{self.prog}: error: {message} (see --help)\n")


def device(s):
    if not re.fullmatch(r"auto|cpu|mps|cuda(:\d+)?", s):
        raise argparse.ArgumentTypeError(f"{s!r}: choose auto, cpu, cuda, cuda:N or mps")
    return s


def number(kind, low, high=math.inf, low_open=False):
    """An argparse type: a finite `kind` in [low, high], or in (low, high] with low_open."""
    def parse(s):
        try:
            v = kind(s)
        except ValueError:
            raise argparse.ArgumentTypeError(f"invalid {kind.__name__} value: {s!r}")
        if not (math.isfinite(v) and (v > low if low_open else v >= low) and v <= high):
            raise argparse.ArgumentTypeError(
                f"{s!r}: must be {'>' if low_open else '>='} {low}" + (f" and <= {high}" if high < math.inf else ""))
        return v
    return parse


def positive(kind):
    return number(kind, 0, low_open=True)


def output_folder(p, flag, path):
    """Refuse, before anything is read or written, an output folder that is (or lies under) a file."""
    for q in (Path(path), *Path(path).parents):
        if q.exists():
            if not q.is_dir():
                p.error(f"{flag} {path}: {q} is a file, not a folder; choose another {flag}")
            return


def build_parser():
    """Every flag, declared once with its default (CleanRL's ppo.py where an --env-id has no preset)."""
    p = Parser(prog="ppo/main.py", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
               allow_abbrev=False)
    g = p.add_argument_group("shared")
    g.add_argument("--device", type=device, default="cpu", help="cpu (fastest for these small networks), auto, cuda, cuda:N, mps")
    g.add_argument("--seed", type=number(int, 0), default=1, help="seeds the networks, the envs and the action noise")
    g.add_argument("--data-dir", default="data", help="unused: the environments are simulated (kept for a uniform interface)")
    g.add_argument("--out-dir", default=None, help="checkpoint, log.csv and figures (default runs/ppo/<env-id>)")
    g.add_argument("--figures-dir", default=None, help="where the curve and GIF go (default: --out-dir); 'images' refreshes the README's")
    g.add_argument("--total-timesteps", "--steps", type=positive(int), default=500_000, help="environment steps in all")
    g.add_argument("--lr", type=positive(float), default=2.5e-4, help="Adam learning rate (annealed to 0)")
    g.add_argument("--resume", action="store_true", help="continue from --out-dir/ckpt.pt with its flags (weights, optimiser, normaliser, counters)")
    g.add_argument("--sample-only", action="store_true", help="skip training: evaluate, curve and GIF from the checkpoint")
    g.add_argument("--pretrained", action="store_true", help="use the shipped weights in pretrained/ppo/ instead of a run folder")
    g.add_argument("--export-pretrained", metavar="RUN_DIR", default=None,
                   help="write pretrained/ppo/<env>.{safetensors,json} from the finished run in RUN_DIR, then stop")
    g.add_argument("--quick", action="store_true", help="40k steps: the whole pipeline on CPU in under a minute")
    g.add_argument("--wandb", action="store_true", help="log to Weights & Biases (off by default)")
    g.add_argument("--benchmark", action="store_true", help="time training's iterations (rollout + update) of these "
                   "flags and print one JSON line (env steps/s, FLOPs, memory); writes nothing")
    g.add_argument("--benchmark-steps", type=positive(int), default=20,
                   help="timed iterations after 3 warm-up ones (with --quick 3, after 1)")
    g.add_argument("--compile", action="store_true", help="not supported: these MLPs are too small to gain from it")

    g = p.add_argument_group("environment")
    g.add_argument("--env-id", default="CartPole-v1", help="any gymnasium id with Discrete or Box actions")
    g.add_argument("--num-envs", type=positive(int), default=4, help="N parallel actors (gymnasium SyncVectorEnv)")
    g.add_argument("--normalize", action=argparse.BooleanOptionalAction, default=False,
                   help="running observation and reward normalisation (preset: on for Pendulum)")

    g = p.add_argument_group("PPO")
    g.add_argument("--num-steps", type=positive(int), default=128, help="T steps per actor per rollout")
    g.add_argument("--update-epochs", type=positive(int), default=4, help="K epochs per rollout")
    g.add_argument("--num-minibatches", type=positive(int), default=4, help="minibatches per epoch")
    g.add_argument("--gamma", type=number(float, 0, 1), default=0.99, help="discount gamma")
    g.add_argument("--gae-lambda", type=number(float, 0, 1), default=0.95, help="GAE lambda")
    g.add_argument("--clip-coef", type=positive(float), default=0.2, help="epsilon of the clipped surrogate")
    g.add_argument("--ent-coef", type=number(float, 0), default=0.01, help="c2, entropy bonus")
    g.add_argument("--vf-coef", type=number(float, 0), default=0.5, help="c1, value loss")
    g.add_argument("--max-grad-norm", type=positive(float), default=0.5, help="global gradient-norm clip")
    g.add_argument("--clip-vloss", action="store_true", help="clip the value loss around the old values")
    g.add_argument("--no-norm-adv", dest="norm_adv", action="store_false", help="do not normalise advantages")
    g.add_argument("--no-anneal-lr", dest="anneal_lr", action="store_false", help="constant learning rate")
    g.add_argument("--target-kl", type=positive(float), default=None, help="stop the epochs early above this approx-KL")

    g = p.add_argument_group("evaluation")
    g.add_argument("--solve-return", type=float, default=None,
                   help="report the step where the last-20-episode mean first reaches this (default: the env's reward_threshold)")
    g.add_argument("--eval-episodes", type=positive(int), default=10, help="greedy evaluation episodes")
    g.add_argument("--save-interval", type=positive(int), default=10, help="iterations between checkpoints")
    g.add_argument("--gif-steps", type=positive(int), default=500, help="frames in the GIF of the trained agent")
    return p


def typed_flags(p, argv):
    """The destinations of the flags typed in argv (abbreviations are off, so a flag is its full name)."""
    typed = {a.split("=", 1)[0] for a in argv if a.startswith("--")}
    return {a.dest for a in p._actions if typed & set(a.option_strings)}


def apply_overrides(args, explicit, *layers):
    """Each layer (a dict of flag values) overrides the declared defaults and the layers before it;
    flags typed on the command line (explicit) override them all."""
    for layer in layers:
        for k, v in layer.items():
            if k not in explicit:
                setattr(args, k, v)
    return args


def parse_args(argv=None):
    argv = [str(a) for a in (sys.argv[1:] if argv is None else argv)]
    p = build_parser()
    args = p.parse_args(argv)
    for flag, path in (("--out-dir", args.out_dir), ("--figures-dir", args.figures_dir)):
        if path:
            output_folder(p, flag, path)
    if args.pretrained and args.resume:
        p.error("--pretrained starts from the shipped weights; --resume continues a run: choose one")
    # The env's preset, then --quick's, then a resumed run's flags (its env id too, unless typed), or the
    # shipped agent's normalisation; flags typed on the command line win over all of them.
    layers = [PRESETS.get(args.env_id, {}), QUICK if args.quick else {}]
    if args.pretrained:
        layers.append({"normalize": pretrained_card(args.env_id)["config"]["normalize"]})
    elif args.resume or args.sample_only:
        out = Path(args.out_dir or f"runs/ppo/{args.env_id}")
        saved = load_checkpoint(out / "ckpt.pt").get("args", {})
        layers.append({k: v for k, v in saved.items() if k not in NOT_RESUMED})
    args = apply_overrides(args, typed_flags(p, argv), *layers)
    if args.solve_return is None and args.env_id in gym.registry:
        args.solve_return = gym.spec(args.env_id).reward_threshold
    batch = args.num_envs * args.num_steps
    if batch % args.num_minibatches or batch // args.num_minibatches < 2:
        p.error(f"--num-envs x --num-steps ({batch}) must split into --num-minibatches "
                f"{args.num_minibatches} equal minibatches of 2 or more")
    if args.total_timesteps < batch:
        p.error(f"--total-timesteps {args.total_timesteps} is less than one rollout "
                f"(--num-envs x --num-steps = {batch})")
    if args.compile:
        p.error("--compile: not supported by ppo (two 64-wide MLPs; the time goes to the environments)")
    args.out_dir = args.out_dir or f"runs/ppo/{args.env_id}"
    args.figures_dir = args.figures_dir or args.out_dir
    return args


def command_of(saved):
    """The `python ppo/main.py ...` that reproduces a run's flags: those that differ from the declared
    defaults and the env's preset (for the card of --export-pretrained)."""
    p = build_parser()
    reference = vars(apply_overrides(p.parse_args([]), set(), PRESETS.get(saved["env_id"], {})))
    if reference["solve_return"] is None and saved["env_id"] in gym.registry:
        reference["solve_return"] = gym.spec(saved["env_id"]).reward_threshold
    words = ["python", "ppo/main.py"]
    for a in p._actions:
        v = saved.get(a.dest, reference.get(a.dest))
        if a.dest in NOT_RESUMED - {"total_timesteps", "pretrained"} or a.dest in ("help", "data_dir") or v == reference.get(a.dest):
            continue
        if isinstance(a, argparse.BooleanOptionalAction):
            words.append(a.option_strings[0] if v else a.option_strings[1])
        elif a.nargs == 0:  # store_true / store_false
            words.append(a.option_strings[0])
        else:
            words += [a.option_strings[0], str(v)]
    return " ".join(words)


def main(argv=None):
    args = parse_args(argv)
    if args.export_pretrained:
        return export_pretrained(Path(args.export_pretrained), command_of)
    if args.benchmark:
        return benchmark(args)
    if not args.sample_only:
        train(args)  # ends with a greedy evaluation
    sample(args, evaluate_policy=args.sample_only)


if __name__ == "__main__":
    main()
