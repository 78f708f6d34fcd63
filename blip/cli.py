"""Stage commands: ``python -m blip <stage> ...``; each runs one stage function of ``blip/stages``.

This module only parses arguments (built from the stage registry), loads the params, opens the
stage's MLflow run, and re-launches training stages under ``torchrun`` when
``compute.nproc_per_node`` asks for more than one process. Multi-GPU by hand: ``torchrun
--nproc_per_node N -m blip pretrain ...`` (the trainer joins the process group torchrun describes).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

from . import params as params_module
from .params import ParamsError
from .stages.common import StageError
from .stages.registry import STAGES, Stage


def _nproc(p: params_module.Params) -> int:
    n = p.compute.nproc_per_node
    if n == "auto":
        import torch

        return max(1, torch.cuda.device_count())
    return int(n)


def _relaunch_under_torchrun(nproc: int, argv: list[str]) -> int:
    """Run this very command as ``torchrun --nproc_per_node N -m blip ...`` (one process per GPU)."""
    import subprocess

    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}", "-m", "blip",
           *argv]
    print("launching:", " ".join(cmd), flush=True)
    return subprocess.call(cmd)


def _common(sp: argparse.ArgumentParser) -> None:
    sp.add_argument("--params", default="params.yaml", help="parameters file (default: params.yaml)")
    sp.add_argument("--set", dest="overrides", action="append", default=[], metavar="SECTION.KEY=VALUE",
                    help="override a parameter for this call only (repeatable), e.g. --set pretrain.epochs=2; "
                         "pipeline runs change params.yaml instead (dvc exp run -S), so dvc.lock stays true")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m blip", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="stage", required=True)
    for stage in STAGES.values():
        where = f"section {stage.section}, job {stage.job} ({stage.model_class})" if stage.trains else ""
        reads = f"params: {', '.join(stage.reads)}" + (f"; {where}" if where else "")
        sp = sub.add_parser(stage.name, help=stage.help, description=f"{stage.help} ({reads})")
        _common(sp)
        sp.add_argument("--run-name", default=None, help="MLflow child run name (default: the stage)")
        for arg in stage.args:
            sp.add_argument(f"--{arg.name}", dest=arg.key, required=arg.required,
                            nargs="+" if arg.many else None, default=arg.default, help=arg.help)
    pp = sub.add_parser("params", help="validate params.yaml (every section); --variant NAME overlays params-NAME.yaml")
    _common(pp)
    pp.add_argument("--variant", default=None, help="e.g. smoke (CI): writes params-smoke.yaml's keys into --params")
    pl = sub.add_parser("plan", help="price a run: per stage samples, steps, FLOPs and GPU-hours at a stated MFU")
    _common(pl)
    from .plan import add_arguments

    add_arguments(pl)
    cb = sub.add_parser("calibrate", help="choose the filter threshold from labelled texts (calibrate sample: "
                                          "label a sample of the generated world)")
    from .calibrate import add_arguments as add_calibrate_arguments

    add_calibrate_arguments(cb)
    dm = sub.add_parser("demo", help="generate a small world, pre-train the tiny model, print captions")
    dm.add_argument("--out", default="out/demo")
    dm.add_argument("--steps", type=int, default=300)
    dm.add_argument("--batch-size", type=int, default=32)
    dm.add_argument("--seed", type=int, default=0)
    return p


def run_stage(stage: Stage, p: params_module.Params, root: Path, paths: dict, run_name: str | None = None):
    """Run ``stage`` with its MLflow child run (or no tracking when it is off)."""
    from .pipeline import tracking

    with tracking.stage_run(root, p, run_name or stage.name, stage.logs) as tracker:
        return stage.run(stage, p, tracker, **paths)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser()
    a = parser.parse_args(argv)
    if a.stage == "demo":
        from .demo import run_demo

        run_demo(a.out, a.steps, a.batch_size, a.seed)
        return 0
    try:
        if a.stage == "params":
            if a.variant:
                params_module.apply_variant(a.params, a.variant)
                print(f"{a.params}: variant {a.variant!r} applied")
            params_module.load(a.params, a.overrides)
            print(f"{a.params}: valid")
            return 0
        if a.stage == "plan":
            from .plan import main as plan_main

            return plan_main(a)
        if a.stage == "calibrate":
            from .calibrate import main as calibrate_main

            return calibrate_main(a)
        stage = STAGES[a.stage]
        p = params_module.load(a.params, a.overrides)
        if stage.trains and "LOCAL_RANK" not in os.environ and (n := _nproc(p)) > 1:
            return _relaunch_under_torchrun(n, argv)
        paths = {arg.key: getattr(a, arg.key) for arg in stage.args}
        result = run_stage(stage, p, Path(a.params).resolve().parent, paths, a.run_name)
    except (ParamsError, StageError, FileNotFoundError, ValueError) as e:
        parser.exit(2, f"python -m blip {a.stage}: error: {e}\n")
    if stage.name != "report":  # the report prints itself
        # one key a line: a stage's summary on one line would be the longest line of a dvc repro log
        print(json.dumps(result, default=str, indent=1))
    return 0
