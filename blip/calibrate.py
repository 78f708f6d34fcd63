"""Choose the filter's threshold from labelled texts: ``python -m blip calibrate``.

::

    python -m blip calibrate --scores data/capfilt/scores --labels labels.csv --target-precision 0.9 --out out/cal
    python -m blip calibrate --scores DIR --labels labels.csv --keep-fraction 0.3 --score both --out out/cal
    python -m blip calibrate sample --web data/generated/web --scores DIR --n 300 --seed 0 --out labels.csv

``--scores``: the filter stage's per-shard score tables; ``--labels``: a ``key,text,label`` CSV
(``good``/``bad``, ``1``/``0`` or ``match``/``nomatch``), each text one of the key's scored texts.
Writes ``calibration.json`` and ``calibration.png`` into ``--out`` and prints a summary
(``blip/evaluate/calibration.py`` says what each number is). ``sample`` writes such a CSV for the
generated world from its hidden noise labels (``blip/evaluate/calibration_sample.py``).
"""

from __future__ import annotations

import argparse
import json
import os

from .atomic import write_bytes_atomic


def add_arguments(ap: argparse.ArgumentParser) -> None:
    ap.description = __doc__
    ap.formatter_class = argparse.RawDescriptionHelpFormatter
    ap.add_argument("--scores", default=None, help="the filter stage's score tables (folder of *.parquet)")
    ap.add_argument("--labels", default=None, help="key,text,label CSV of labelled texts")
    rule = ap.add_mutually_exclusive_group()
    rule.add_argument("--target-precision", type=float, default=None,
                      help="the lowest threshold whose precision on the labels is >= this (default 0.9)")
    rule.add_argument("--keep-fraction", type=float, default=None,
                      help="instead: the threshold keeping this fraction of all scored texts (DataComp: 0.3)")
    ap.add_argument("--score", choices=("itm", "itc", "both"), default="itm",
                    help="itm: ITM p(match) (BLIP's filter); itc: ITC cosine; both (default itm)")
    ap.add_argument("--allow-unmatched", action="store_true",
                    help="skip label rows that match no scored text (counted) instead of stopping")
    ap.add_argument("--out", default=None, help="folder for calibration.json and calibration.png")
    sub = ap.add_subparsers(dest="action", metavar="sample")
    sp = sub.add_parser("sample", help="a labelled sample of the generated world's web texts (hidden labels)")
    sp.add_argument("--web", required=True, help="the generated web shards the filter scored")
    sp.add_argument("--scores", required=True, help="the filter stage's score tables of those shards")
    sp.add_argument("--n", type=int, default=300, help="rows to sample (default 300)")
    sp.add_argument("--seed", type=int, default=0)
    sp.add_argument("--out", required=True, help="the CSV to write (key,text,label)")


def main(args: argparse.Namespace) -> int:
    if args.action == "sample":
        from .evaluate.calibration_sample import labelled_sample, write_labels

        rows = labelled_sample(args.web, args.scores, args.n, args.seed)
        write_labels(rows, args.out)
        n_good = sum(r["label"] == "good" for r in rows)
        print(f"{args.out}: {len(rows)} web texts ({n_good} good, {len(rows) - n_good} bad)")
        return 0
    missing = [f"--{k}" for k in ("scores", "labels", "out") if getattr(args, k) is None]
    if missing:
        raise ValueError(f"{' and '.join(missing)} required (or: calibrate sample ...)")
    from .evaluate.calibration import calibrate, summary
    from .evaluate.calibration_plot import plot_calibration

    cal = calibrate(args.scores, args.labels, args.target_precision, args.keep_fraction, args.score,
                    args.allow_unmatched)
    os.makedirs(args.out, exist_ok=True)
    json_path, png_path = os.path.join(args.out, "calibration.json"), os.path.join(args.out, "calibration.png")
    write_bytes_atomic(json_path, (json.dumps(cal.report, indent=1, allow_nan=False) + "\n").encode())
    plot_calibration(cal.report, cal.labelled, png_path)
    print(summary(cal.report))
    print(f"wrote {json_path}, {png_path}")
    return 0
