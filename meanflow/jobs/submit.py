"""``python jobs/submit.py --cluster local --config tiny_imf [key=value ...]``: the user's entry point (argument
parsing; submit_training.py submits, job_callables.py is what runs inside the jobs).

Training is the default command; the others act on a run directory:
    eval    score committed steps (FID/IS or SW)      sample  samples of a step as PNG + .npz
    export  EMA weights + model config (safetensors)  plot    loss, jvp_norm and FID vs step as a PNG
    status  jobs and their states, committed steps, last metrics, guard events, evaluations

Exit codes (outcome.py): 0 done; 1 training failed; 2 bad input (config key, file, URL, or flag), with a message
naming it.
"""

from __future__ import annotations

import argparse
import sys

from meanflow.platform.config import load_config

from .outcome import run_command

# command -> the module with its add_arguments(parser) and run(args), imported only when the command runs
COMMANDS = {"eval": "meanflow.jobs.evaluate", "sample": "meanflow.jobs.sample", "export": "meanflow.jobs.export",
            "plot": "meanflow.jobs.plot", "status": "meanflow.jobs.status"}


def parse_train_args(argv):
    p = argparse.ArgumentParser(prog="jobs/submit.py", description=__doc__.splitlines()[0],
                                epilog=f"other commands: jobs/submit.py {{{','.join(COMMANDS)}}} --help")
    p.add_argument("--cluster", choices=("local", "debug", "slurm"), default="local",
                   help="slurm: sbatch through submitit; local: submitit's local executor on this machine (one "
                        "process per task; CPU without a GPU); debug: in this process (breakpoints work)")
    p.add_argument("--config", default="tiny_imf", help="configs/<name>.yaml or a path to a YAML file")
    p.add_argument("--run-dir", help="fsspec URL of the run directory (default ./runs/<run.name>)")
    p.add_argument("--resume", action="store_true", help="continue from the newest committed checkpoint")
    p.add_argument("--dry-run", action="store_true", help="print the sbatch script and the resolved config only")
    for flag, key, kind in (("--nodes", "nodes", int), ("--gpus-per-node", "gpus_per_node", int),
                            ("--partition", "partition", str), ("--account", "account", str),
                            ("--qos", "qos", str), ("--time", "time", str)):
        p.add_argument(flag, type=kind, dest=key, help=f"cluster.{key}")
    p.add_argument("overrides", nargs="*", help="dotlist overrides, e.g. run.steps=100 optim.lr=3e-4")
    return p.parse_intermixed_args(argv)


CLUSTER_FLAGS = ("nodes", "gpus_per_node", "partition", "account", "qos", "time")


def train(args) -> int:
    overrides = list(args.overrides)
    if args.run_dir:
        overrides.append(f"run.run_dir={args.run_dir}")
    if args.resume:
        overrides.append("run.resume=true")
    # quoted: YAML would read 12:00:00 as the sexagesimal number 43200
    overrides += [f"cluster.{key}='{getattr(args, key)}'" if isinstance(getattr(args, key), str)
                  else f"cluster.{key}={getattr(args, key)}" for key in CLUSTER_FLAGS if getattr(args, key) is not None]
    cfg = load_config(args.config, overrides)
    from meanflow.jobs.submit_training import submit_training   # heavy imports after the config is valid
    return submit_training(cfg, args.cluster, dry_run=args.dry_run)


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv and argv[0] in COMMANDS:
        import importlib

        module = importlib.import_module(COMMANDS[argv[0]])
        p = argparse.ArgumentParser(prog=f"jobs/submit.py {argv[0]}", description=module.__doc__.splitlines()[0])
        module.add_arguments(p)
        return run_command(module.run, p.parse_intermixed_args(argv[1:]))
    return run_command(train, parse_train_args(argv))
