"""`vlp` sub-commands of vlp_core.capfilt (registered by vlp_core.cli).

    vlp capfilt --manifest M --captioner DIR|none --filter DIR --out DIR [--calibration M] [--round N]
    vlp capfilt rethreshold --corpus DIR --out DIR [--itm-threshold T | --percentile P]

``M`` is an ingest manifest or the ingest folder holding ``manifest.parquet``; model folders
are vlp_core checkpoints or local Hugging Face BLIP folders; ``--captioner none`` runs the filter
alone on the web texts (BLIP's "F alone"; the only CapFilt a ViLBERT model can do).  ``rethreshold`` without
``--itm-threshold``/``--percentile`` reads the keep rule from the params: ``-S
capfilt.itm_threshold=T`` (implies the fixed rule) or ``capfilt.threshold_mode`` with
``capfilt.itm_threshold`` / ``capfilt.calibrate_percentile``.  Heavy imports stay inside the
handlers so ``vlp --help`` stays fast.
"""
from __future__ import annotations

import argparse
import os


def _entry_threads() -> None:
    import torch

    torch.set_num_threads(int(os.environ.get("TORCH_NUM_THREADS", "2")))


def _summary(stats) -> str:
    kept = {k[5:]: v for k, v in stats.counts.items() if k.startswith("kept:")}
    rejected = {k[7:]: v for k, v in stats.counts.items() if k.startswith("reason:")}
    skipped = {k[8:]: v for k, v in stats.counts.items() if k.startswith("skipped:")}
    lines = [f"{stats.stage}: {stats.rows_out} candidate rows ({stats.extra.get('images', '?')} images), "
             f"kept {kept}, rejected {rejected}",
             f"ITM threshold {stats.extra.get('itm_threshold'):.4f}; shards: {stats.shards_done} done, "
             f"{stats.shards_skipped} resumed" + (f", FAILED {stats.shards_failed}" if stats.shards_failed else "")]
    if skipped:
        lines.append(f"manifest rows not captioned (status): {skipped}")
    for name, err in stats.extra.get("shard_errors", {}).items():
        lines.append(f"  shard {name}: {err}")
    return "\n".join(lines)


def _cmd_capfilt(args: argparse.Namespace) -> int:
    from vlp_core.cli import load_params_from_args

    if getattr(args, "capfilt_command", None) == "rethreshold":
        return _cmd_rethreshold(args)
    missing = [f"--{n}" for n in ("manifest", "captioner", "filter", "out") if not getattr(args, n)]
    if missing:
        from vlp_core.errors import VlpError

        raise VlpError(f"vlp capfilt: missing {', '.join(missing)}")
    from vlp_core.capfilt.stage import run_capfilt

    params = load_params_from_args(args)
    _entry_threads()
    captioner = None if args.captioner == "none" else args.captioner
    stats = run_capfilt(params, args.manifest, captioner, args.filter, args.out, round=args.round,
                        calibration=args.calibration, device=args.device)
    print(_summary(stats))
    return 1 if stats.shards_failed else 0


def _cmd_rethreshold(args: argparse.Namespace) -> int:
    from vlp_core.capfilt.rethreshold import rethreshold
    from vlp_core.cli import load_params_from_args

    params = load_params_from_args(args)
    thr, pct = args.itm_threshold, args.percentile
    if thr is None and pct is None:
        given = {o.split("=", 1)[0].strip() for o in args.overrides}
        if params.capfilt.threshold_mode == "fixed" or (
                "capfilt.itm_threshold" in given and "capfilt.threshold_mode" not in given):
            thr = params.capfilt.itm_threshold
        else:
            pct = params.capfilt.calibrate_percentile
    stats = rethreshold(args.corpus, args.out, itm_threshold=thr, percentile=pct, calibration=args.calibration,
                        keep_top=params.capfilt.keep_top)
    print(_summary(stats))
    return 0


def register(subparsers) -> None:
    """``vlp capfilt`` and ``vlp capfilt rethreshold``."""
    from vlp_core.cli import add_params_args

    p = subparsers.add_parser("capfilt", help="caption every web image and filter every candidate text (CapFilt)",
                              description="Caption every image of an ingest manifest and score/filter every "
                                          "candidate text (web alt-text + K synthetic captions).")
    p.add_argument("--manifest", help="ingest manifest.parquet or the ingest folder holding it")
    p.add_argument("--captioner", help="captioner model folder (vlp checkpoint or HF BlipForConditionalGeneration), "
                                       "or 'none': no synthetic captions, the filter judges the web texts only")
    p.add_argument("--filter", help="filter model folder (vlp checkpoint or HF BlipForImageTextRetrieval)")
    p.add_argument("--out", help="output folder (corpus/, threshold.json, stats.json)")
    p.add_argument("--calibration", default=None, help="clean (human) manifest for threshold_mode=calibrated")
    p.add_argument("--round", type=int, default=0, help="round number recorded in every row")
    p.add_argument("--device", default=None, help="torch device (default: cuda if available, else cpu)")
    add_params_args(p)
    p.set_defaults(func=_cmd_capfilt)
    sub = p.add_subparsers(dest="capfilt_command", metavar="{rethreshold}")
    r = sub.add_parser("rethreshold", help="apply a new ITM threshold to stored scores (DuckDB, no model pass)")
    r.add_argument("--corpus", required=True, help="a capfilt output folder (or its corpus/)")
    r.add_argument("--out", required=True, help="where the rethresholded corpus goes")
    g = r.add_mutually_exclusive_group()
    g.add_argument("--itm-threshold", type=float, default=None, help="keep candidates with ITM above this")
    g.add_argument("--percentile", type=float, default=None,
                   help="keep above this percentile of the stored clean-pair ITM scores")
    r.add_argument("--calibration", default=None, help="calibration.parquet (default: beside the corpus)")
    add_params_args(r)
    r.set_defaults(func=_cmd_rethreshold)
