"""Train an invariant network on a variant of MNIST, Fashion-MNIST or CIFAR-10 and write metrics.

Usage::

    python -m inference.train --dataset rotated-mnist --out runs/rotated --data-dir ../shared/data
    python -m inference.train --dataset rotated-cifar10 --out runs/rotated-cifar10 --data-dir DATA
    python -m inference.train --dataset rotated-mnist --out runs/ddp --device cuda --strategy ddp --devices 2

The model's input shape follows the dataset (1 x 28 x 28, or 3 x 32 x 32 for CIFAR-10).

Writes ``OUT/metrics.json`` (learned eta per generator in the units of T, test accuracy, test
NLL, ELBO per example, training time, data provenance and the full config),
``OUT/eta_history.csv`` (step, one column per generator), ``OUT/elbo_history.csv`` (the ELBO / N and its
terms, expected log-likelihood and KL, at the same steps), ``OUT/checkpoints/step-*.pt``
(every ``--checkpoint-every`` steps, at the last step and on Ctrl-C).

Ctrl-C (or SIGTERM, SIGHUP) finishes the current step, saves a checkpoint and prints the command
that continues the run: ``--resume OUT``. The resumed run ends where an uninterrupted run with the
same seed ends; a checkpoint from different settings or data is refused, except for the learning
rates (``--resume OUT --lr 0.0005`` goes on at a lower rate, e.g. after a divergence). A folder that
already holds a run is refused unless ``--resume`` or ``--overwrite`` is given, and one held by
another process is refused.
"""

from __future__ import annotations

import argparse
import functools
import math
import re
import shlex
import sys
from pathlib import Path

from guides.factory import POINT_FIRST_LAYER, GuideKind, InitLoc
from inference import commands, distributed
from inference import launch as launching
from inference.checkpoint import CHECKPOINT_DIRNAME, list_checkpoints
from inference.cli import one_line, run_cli
from inference.config import CONFIG_FILENAME, EvalConfig, GuideConfig, RunConfig, derive
from inference.data import DataConfig, DatasetName
from inference.eta_objectives import EtaObjective, EvidenceSchedule
from inference.run_folder import check_out
from inference.runner import RunControl, run
from inference.stopping import TrainingInterrupted
from inference.svi import TrainConfig
from models.config import GENERATOR_PRESETS, Averaging, FirstLayer, ModelConfig, TransformMode, check_positive_float
from models.priors import EtaPrior, PriorKind
from models.transforms import ALL_GENERATOR_NAMES, generator_basis

EVAL_SAMPLES = 32
"""Default M of the test predictive. Measured on the main job's run (runs/rotated-mnist, 64 draws in groups of M):
accuracy 86.6 +- 1.4 % with one draw, 88.0 +- 0.7 with 4, 88.7 +- 0.6 with 16, 88.8 (both groups of 32 alike)."""


def parse_max_shift(text: str) -> float | None:
    """``--max-shift``: a positive number of half-frames, or ``none`` (unbounded)."""
    if text.strip().lower() == "none":
        return None
    try:
        return check_positive_float("--max-shift", float(text))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive number or 'none', got {text!r}") from None


def parse_generators(text: str) -> tuple[str, ...]:
    """A preset name (``none``, ``rotation``, ..., ``affine``, ``affine-iso``) or a comma list of one basis."""
    if text in GENERATOR_PRESETS:
        return GENERATOR_PRESETS[text]
    names = tuple(t.strip() for t in text.split(",") if t.strip())
    try:
        generator_basis(names)
    except ValueError as err:
        raise argparse.ArgumentTypeError(f"{err} (or a preset from {sorted(GENERATOR_PRESETS)})") from None
    return names


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter
    )
    add_data_args(p.add_argument_group("data"))
    _add_model_args(p.add_argument_group("model"))
    _add_inference_args(p.add_argument_group("inference"))
    _add_run_args(p.add_argument_group("run"))
    distributed.add_flags(p)  # --strategy ddp, --devices, --num-nodes (inference/distributed.py)
    return p


def add_data_args(g: argparse._ArgumentGroup | argparse.ArgumentParser) -> None:
    """The data flags (:class:`inference.data.DataConfig`), read back by :func:`data_config_from_args`."""
    d = DataConfig()
    g.add_argument("--dataset", type=DatasetName, choices=list(DatasetName), default=d.dataset, metavar="NAME",
                   help=f"one of {[x.value for x in DatasetName]}")
    g.add_argument("--data-dir", default=None,
                   help="data root holding MNIST/raw, FashionMNIST/raw or cifar-10-batches-py (torchvision's layout; "
                   "default: $INVW_DATA_DIR, else ./data)")
    g.add_argument("--download", action="store_true",
                   help="let torchvision download the dataset's source if it is missing")
    g.add_argument("--train-size", type=int, default=None,
                   help="class-balanced, shuffled training subset (default: all)")
    g.add_argument("--test-size", type=int, default=None, help="class-balanced, shuffled test subset (default: all)")
    g.add_argument("--rotation-deg", type=float, default=None, help="data rotation range U[-a, a] (default 180 / 90)")
    g.add_argument("--translation-px", type=float, default=d.translation_px, help="data translation range in pixels")
    g.add_argument("--log-scale", type=float, default=d.log_scale, help="data scale exp(s), s ~ U[-v, v]")
    g.add_argument("--data-seed", type=int, default=d.data_seed, help="seed of the one-off data transformation")
    g.add_argument("--canvas", type=int, default=d.canvas, metavar="PX",
                   help="pad the images with zeros to PX x PX before transforming them (default: the source's size)")


def _add_model_args(g: argparse._ArgumentGroup) -> None:
    m = ModelConfig()
    g.add_argument("--hidden", type=int, default=m.hidden, help="hidden units D")
    g.add_argument("--first-layer", type=FirstLayer, choices=list(FirstLayer), default=m.first_layer)
    g.add_argument("--transform-mode", type=TransformMode, choices=list(TransformMode), default=m.transform_mode)
    g.add_argument("--rff-scale", type=float, default=m.rff_scale,
                   help="RFF only: W1 ~ N(0, s^2 / pixels), an RBF kernel of lengthscale sqrt(pixels) / s")
    g.add_argument("--rff-blur", type=float, default=m.rff_blur,
                   help="RFF only: Gaussian blur of the random filters, in pixels (0: white noise)")
    g.add_argument("--averaging", type=Averaging, choices=list(Averaging), default=m.averaging)
    g.add_argument("--num-transforms", type=int, default=m.num_transforms,
                   help="S transformation samples per training step")
    g.add_argument("--eval-transforms", type=int, default=m.num_transforms, help="S at evaluation")
    g.add_argument("--eval-samples", type=int, default=EVAL_SAMPLES, metavar="M",
                   help="weight draws from q averaged in the test predictive (metrics.json also keeps the first "
                   "draw's accuracy and NLL as test_accuracy_one_draw, test_nll_one_draw)")
    g.add_argument("--elbo-passes", type=int, default=4,
                   help="passes over the training set for the reported ELBO / N (mean and standard error; "
                   "32 for comparisons to 0.01 / example)")
    g.add_argument("--generators", type=parse_generators, default="affine",
                   help=f"preset {sorted(GENERATOR_PRESETS)} or comma list of {list(ALL_GENERATOR_NAMES)} "
                        "from one basis (scale_x, scale_y: the paper's; scale, stretch: isotropic)")
    g.add_argument("--eta-init-deg", type=float, default=math.degrees(m.eta_init),
                   help="initial eta in degrees (radians for rotate; the same number in T's units for the others)")
    g.add_argument("--max-shift", type=parse_max_shift, default=None,
                   help="bound the translation extents smoothly at this many half-frames (1: a filter's centre "
                   "stays on the image), so no sampled shift deletes the input; 'none': unbounded (the paper's, "
                   "the default of train; extents and compare --preset table2 default to 1)")
    g.add_argument("--fixed-eta", action="store_true", help="keep eta at its initial value (fixed-eta baselines)")
    g.add_argument("--prior", type=PriorKind, choices=list(PriorKind), default=m.prior, help="weight prior family")
    g.add_argument("--prior-scale", type=float, default=m.prior_scale, help="alpha: weights ~ N(0, alpha^2)")
    g.add_argument("--eta-prior", type=EtaPrior, choices=list(EtaPrior), default=m.eta_prior,
                   help="'uniform': full Bayes, eta ~ U(0, pi) with q(eta) from the guide; 'none': empirical Bayes")
    g.add_argument("--first-layer-prior", choices=["on", "off"], default="off",
                   help="'off': W1, b1 have no prior, hyperparameters like eta (ML-II, the paper's ReLU network; "
                        "point-estimate guides only); 'on': a prior on them, needed by guides with a distribution "
                        "over W1 and by the evidence objective")
    g.add_argument("--output-layer-prior", choices=["on", "off"], default="on",
                   help="'off' (with --first-layer-prior off): no weight prior at all, for --guide ml")


def _add_inference_args(g: argparse._ArgumentGroup) -> None:
    t = TrainConfig()
    g.add_argument("--guide", type=GuideKind, choices=list(GuideKind), default=GuideKind.HYBRID)
    g.add_argument("--init-scale", type=float, default=0.1, help="initial std of Gaussian guide factors")
    g.add_argument("--init-loc", type=InitLoc, choices=list(InitLoc), default=InitLoc.XAVIER)
    g.add_argument("--num-steps", type=int, default=t.num_steps)
    g.add_argument("--batch-size", type=int, default=t.batch_size)
    g.add_argument("--lr", type=float, default=t.lr)
    g.add_argument("--eta-lr", type=float, default=t.eta_lr)
    g.add_argument("--num-particles", type=int, default=t.num_particles, help="K weight samples per step")
    g.add_argument("--no-vectorize", action="store_true", help="loop over particles instead of vectorising")
    g.add_argument("--no-cosine", action="store_true", help="constant learning rates")
    g.add_argument("--eta-objective", type=EtaObjective, choices=list(EtaObjective), default=t.eta_objective,
                   help="what sets eta: 'elbo' the guide's own ELBO (the paper); 'evidence' the ELBO of a mean-field "
                        "guide over every weight while --guide (hybrid/paper) predicts, the recommended setting for "
                        "partial invariance; 'heldout' a held-out part's log-likelihood (inference/eta_objectives.py)")
    g.add_argument("--eta-holdout", type=float, default=t.eta_holdout, metavar="F",
                   help="'heldout' objective only: fraction of the training set held out for eta")
    g.add_argument("--eta-burnin", type=int, default=t.eta_burnin, metavar="STEPS",
                   help="eta stays at its initial value for the first STEPS steps while the guide(s) settle "
                        "(the burn-in of marginal-likelihood hyperparameter learning, Immer et al. 2021, 2022)")
    g.add_argument("--evidence-schedule", type=EvidenceSchedule, choices=list(EvidenceSchedule),
                   default=t.evidence_schedule,
                   help="'evidence' objective only: 'joint' trains both guides every step (the predicting one at the "
                        "current eta, MAP in W1); 'sequential' first learns eta with the evidence guide for "
                        "--num-steps, then trains the predicting guide (W1 a hyperparameter, as in the paper) at "
                        "that eta for --num-steps more")
    g.add_argument("--evidence-lr", type=float, default=t.evidence_lr,
                   help="'evidence' objective only: Adam's learning rate for the mean-field guide over every weight "
                        "(default: --lr)")


def _add_run_args(g: argparse._ArgumentGroup) -> None:
    g.add_argument("--config", default=None, metavar="RUN/config.json",
                   help="train the run this config file (or run folder) describes; then only the flags of this "
                   "group may be given")
    g.add_argument("--out", default=None, help="output directory (required unless --resume is given)")
    g.add_argument("--resume", default=None, metavar="DIR",
                   help="continue the run in DIR from its newest valid checkpoint, with its settings (config.json); "
                   "only the learning rates (--lr, --eta-lr, --evidence-lr) may be changed")
    g.add_argument("--overwrite", action="store_true",
                   help="replace the run in --out: its files are removed once the new run starts training")
    g.add_argument("--checkpoint-every", type=int, default=100, metavar="N",
                   help="save a checkpoint every N steps (0: only at the end and on Ctrl-C)")
    g.add_argument("--keep-checkpoints", type=int, default=3, metavar="K", help="keep the newest K checkpoints")
    g.add_argument("--seed", type=int, default=TrainConfig().seed)
    g.add_argument("--device", type=parse_device, default="cpu", metavar="{cpu,cuda,cuda:N}",
                   help="where to train; cuda:N picks one of several GPUs (compare / extents --jobs: one per worker)")
    g.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    g.add_argument("--no-progress", action="store_true", help="no progress bar")
    g.add_argument("--tensorboard", action="store_true",
                   help="also log the ELBO's terms and eta of every logged step to OUT/tensorboard/ (needs the "
                        "optional tensorboard package; view with: tensorboard --logdir OUT)")


RUN_CONTROL = frozenset({"config", "out", "resume", "overwrite", "checkpoint_every", "keep_checkpoints", "threads",
                         "no_progress", "tensorboard"}) | distributed.FLAGS
"""Flags that say how to run, not what: the only ones that go with ``--config``."""


RESUME_OVERRIDES = {"--lr": "lr", "--eta-lr": "eta_lr", "--evidence-lr": "evidence_lr"}
"""The flags that may change a resumed run (:data:`inference.checkpoint.RESUMABLE_CHANGES`), to TrainConfig fields."""


@functools.cache
def _parser_defaults() -> dict:
    return vars(build_parser().parse_args([]))


def check_model_fits(guide: GuideKind, objective: EtaObjective, prior: PriorKind, first_layer_prior: bool,
                     output_layer_prior: bool) -> None:
    """Refuse, in command-line terms, a guide, objective or prior that does not fit the model the flags describe."""
    if prior is PriorKind.HIERARCHICAL and not (first_layer_prior and output_layer_prior):
        raise ValueError("--prior hierarchical infers the prior scale of every weight: add --first-layer-prior on "
                         "(and keep --output-layer-prior on)")
    if not first_layer_prior and guide not in (*POINT_FIRST_LAYER, GuideKind.MAP, GuideKind.ML):
        raise ValueError(f"--guide {guide.value} puts a distribution over W1, which needs its prior: add "
                         "--first-layer-prior on (by default W1 is a hyperparameter, as in the paper's ReLU network)")
    if not first_layer_prior and objective is EtaObjective.EVIDENCE:
        raise ValueError("--eta-objective evidence integrates every weight under its prior: add --first-layer-prior on")
    if guide is GuideKind.ML and (first_layer_prior or output_layer_prior):
        raise ValueError("--guide ml is maximum likelihood, a model without weight priors: add --first-layer-prior off "
                         "--output-layer-prior off (or use --guide map to keep them)")


def data_config_from_args(args: argparse.Namespace) -> DataConfig:
    """The :class:`DataConfig` of the flags :func:`add_data_args` adds."""
    return DataConfig(dataset=args.dataset, data_dir=args.data_dir, allow_download=args.download,
                      train_size=args.train_size, test_size=args.test_size, rotation_deg=args.rotation_deg,
                      translation_px=args.translation_px, log_scale=args.log_scale, data_seed=args.data_seed,
                      canvas=args.canvas)


def config_from_args(args: argparse.Namespace) -> RunConfig:
    """The run's :class:`RunConfig`: read from ``--config``, or built from the flags (validated by the configs)."""
    given = [f"--{k.replace('_', '-')}" for k, v in vars(args).items()
             if k not in RUN_CONTROL and k in _parser_defaults() and v != _parser_defaults()[k]]
    if getattr(args, "config", None) is not None:
        if given:
            raise ValueError(f"--config defines the run: drop {', '.join(given)} (edit the file, or copy it, to change "
                             "a setting)")
        return RunConfig.load(args.config)
    saved = Path(args.resume) / CONFIG_FILENAME if getattr(args, "resume", None) is not None else None
    if saved is not None and saved.is_file() and set(given) <= set(RESUME_OVERRIDES):
        # `--resume DIR [--lr X]`: the run DIR describes, at the learning rates given
        cfg = RunConfig.load(saved)
        return derive(cfg, train={RESUME_OVERRIDES[flag]: getattr(args, RESUME_OVERRIDES[flag]) for flag in given})
    data = data_config_from_args(args)
    objective = EtaObjective(args.eta_objective)
    first_layer_prior, output_layer_prior = args.first_layer_prior == "on", args.output_layer_prior == "on"
    check_model_fits(GuideKind(args.guide), objective, PriorKind(args.prior), first_layer_prior,
                     output_layer_prior)
    model = ModelConfig(image_shape=data.image_shape, hidden=args.hidden, first_layer=args.first_layer,
                        rff_scale=args.rff_scale, rff_blur=args.rff_blur, transform_mode=args.transform_mode,
                        averaging=args.averaging,
                        num_transforms=args.num_transforms, generators=args.generators,
                        eta_init=math.radians(args.eta_init_deg), learn_eta=not args.fixed_eta,
                        prior=args.prior, prior_scale=args.prior_scale, eta_prior=args.eta_prior,
                        first_layer_prior=first_layer_prior, output_layer_prior=output_layer_prior,
                        max_shift=args.max_shift)
    train = TrainConfig(num_steps=args.num_steps, batch_size=args.batch_size, lr=args.lr, eta_lr=args.eta_lr,
                        num_particles=args.num_particles, vectorize_particles=not args.no_vectorize,
                        cosine=not args.no_cosine, seed=args.seed, eta_objective=objective,
                        eta_holdout=args.eta_holdout, evidence_lr=args.evidence_lr, eta_burnin=args.eta_burnin,
                        evidence_schedule=args.evidence_schedule)
    if args.eval_transforms < 1 or args.eval_samples < 1 or args.elbo_passes < 1:
        raise ValueError("--eval-transforms, --eval-samples and --elbo-passes must be positive integers")
    if not (math.isfinite(args.init_scale) and args.init_scale > 0):
        raise ValueError(f"--init-scale must be > 0 and finite, got {args.init_scale}")
    return RunConfig(data=data, model=model, guide=GuideConfig(args.guide, args.init_scale, args.init_loc),
                     train=train, eval=EvalConfig(args.eval_transforms, args.eval_samples, args.elbo_passes),
                     device=args.device)


def output_dir(args: argparse.Namespace) -> Path:
    """``--resume DIR`` or ``--out DIR``; both must name the same directory when both are given."""
    if args.resume is None and args.out is None:
        raise ValueError("one of --out DIR or --resume DIR is required")
    for value in (args.out, args.resume):
        if value is not None:
            check_out(value)
    if args.resume is not None and args.out is not None and Path(args.out).resolve() != Path(args.resume).resolve():
        raise ValueError(f"--out {args.out} and --resume {args.resume} name different directories; "
                         "a resumed run continues in its own directory")
    return Path(args.resume if args.resume is not None else args.out)


def parse_device(text: str) -> str:
    """``cpu``, ``cuda`` or ``cuda:N``."""
    if text in ("cpu", "cuda") or re.fullmatch(r"cuda:\d+", text):
        return text
    raise argparse.ArgumentTypeError(f"expected cpu, cuda or cuda:N, got {text!r}")


def control_from_args(args: argparse.Namespace) -> RunControl:
    """The run-control flags as a :class:`RunControl`."""
    return RunControl(output_dir(args), args.resume is not None, args.checkpoint_every, args.keep_checkpoints,
                      args.threads, not args.no_progress, args.overwrite, args.tensorboard)


def main(args: argparse.Namespace) -> dict:
    """Train, evaluate and write ``metrics.json`` and ``eta_history.csv``; returns the metrics (None on a rank
    other than 0 of data-parallel training)."""
    launch = distributed.Launch.from_args(args)
    cfg, control = config_from_args(args), control_from_args(args)
    if getattr(args, "reuse", False):  # a job of a printed grid (inference/commands.py): finished, resumed or started
        control, finished = commands.reuse(cfg, control)
        if finished is not None:
            return finished
    if launch.strategy is distributed.Strategy.DDP:  # this process is one rank (inference/distributed.py)
        return launching.run_rank(cfg, control, launch)
    return run(cfg, control)


def resume_command(run_dir: str, *extra: str) -> str:
    """The command line that continues the run in ``run_dir`` (its settings are in its config.json)."""
    return shlex.join([Path(sys.executable).name, "-m", "inference.train", "--resume", str(run_dir), *extra])


def interrupt_message(err: KeyboardInterrupt, args: argparse.Namespace) -> str:
    """One line for Ctrl-C or a termination signal: where training stopped, what was saved, how to continue."""
    run_dir = args.resume if args.resume is not None else args.out
    if isinstance(err, TrainingInterrupted):
        text = str(err)
        has_checkpoint = err.checkpoint is not None
    else:
        newest = list_checkpoints(Path(run_dir) / CHECKPOINT_DIRNAME) if run_dir is not None else []
        has_checkpoint = bool(newest)
        text = "interrupted" + (f"; the newest checkpoint is {newest[-1][1]}" if newest else "; nothing was saved")
    if has_checkpoint:  # data-parallel runs continue exactly with their processes (inference/distributed.py)
        text += f"; continue with: {resume_command(run_dir, *distributed.Launch.from_args(args).argv())}"
    return text


def divergence_message(err: FloatingPointError, args: argparse.Namespace) -> str:
    """One line for a diverged run, with the command that continues it from the last good checkpoint at half the
    learning rates."""
    text = one_line(err)
    run_dir = args.resume if args.resume is not None else args.out
    if getattr(err, "last_checkpoint", None) is None or run_dir is None:
        return text
    cfg = config_from_args(args).train
    lower = ["--lr", f"{cfg.lr / 2:g}", "--eta-lr", f"{cfg.eta_lr / 2:g}"]
    if cfg.evidence_lr is not None:
        lower += ["--evidence-lr", f"{cfg.evidence_lr / 2:g}"]
    return f"{text}; e.g.: {resume_command(run_dir, *lower, *distributed.Launch.from_args(args).argv())}"


def cli(argv: list[str] | None = None) -> int:
    """Console entry point (:func:`inference.cli.run_cli`): one-line messages for user errors and stop signals.

    Returns
    -------
    int
        0 on success, 2 on a user error, 128 + the signal's number when interrupted (after saving a checkpoint):
        130 for Ctrl-C, 143 for SIGTERM, 129 for SIGHUP.
    """
    argv = sys.argv[1:] if argv is None else list(argv)
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.out is None and args.resume is None:
        parser.error("one of --out DIR or --resume DIR is required")
    if distributed.requested(args) and not launching.is_rank_process():  # start the ranks: this command, each
        return launching.launch_cli(argv, args, lambda a: (config_from_args(a), control_from_args(a)))
    return run_cli(main, args, lambda err: interrupt_message(err, args),
                   lambda err: divergence_message(err, args) if isinstance(err, FloatingPointError) else one_line(err))


if __name__ == "__main__":
    sys.exit(cli())
