"""`vlp run|cycles|deploy|demo` sub-commands (the Prefect faces) (registered by flows.cli).

    vlp run [--round K] [--until STEP] [--init-from DIR] [-S key=value ...]   one round
    vlp cycles [--rounds N] [--start-round K]                               rounds 0..N-1
    vlp deploy [--cron "0 2 * * *"] [--pool vlp-process]                    nightly schedule
    vlp demo [--rounds N] [--port 8765] [--no-controls]                     synthetic web + cycles + table

All run on Prefect's ephemeral API unless PREFECT_API_URL points at a server.
"""
from __future__ import annotations

import argparse
import json


def add_params_args(p: argparse.ArgumentParser) -> None:
    from vlp_core.cli import add_params_args as add

    add(p)


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--workdir", default=".", help="the repo / data root (default: .)")
    add_params_args(p)


def register(subparsers) -> None:
    """Add ``run``, ``cycles``, ``deploy`` and ``demo``."""
    p = subparsers.add_parser("run", help="run one bootstrap round as a Prefect flow (ingest ... record)")
    p.add_argument("--round", type=int, default=0)
    p.add_argument("--until", default=None, help="stop after this step (ingest, pretrain, finetune, capfilt, "
                                                 "features, retrain, evaluate, record)")
    p.add_argument("--init-from", default=None, help="round 0: start from this checkpoint instead of pretraining")
    _common(p)
    p.set_defaults(func=_run)

    c = subparsers.add_parser("cycles", help="run pretrain-filter-retrain rounds as a Prefect flow")
    c.add_argument("--rounds", type=int, default=None, help="rounds in total (default orchestration.rounds)")
    c.add_argument("--start-round", type=int, default=0)
    c.add_argument("--init-from", default=None, help="round 0: start from this checkpoint instead of pretraining")
    _common(c)
    c.set_defaults(func=_cycles)

    d = subparsers.add_parser("deploy", help="create a scheduled Prefect deployment (nightly ingest + CapFilt)")
    d.add_argument("--name", default="nightly")
    d.add_argument("--cron", default=None, help="cron schedule (default orchestration.schedule_cron)")
    d.add_argument("--pool", default=None, help="process work pool (default orchestration.work_pool)")
    _common(d)
    d.set_defaults(func=_deploy)

    m = subparsers.add_parser("demo", help="make the synthetic web, serve it on 127.0.0.1 and run the cycles")
    m.add_argument("--rounds", type=int, default=None)
    m.add_argument("--port", type=int, default=8765, help="port of the loopback server (fixed, so the URL "
                                                          "lists -- DVC inputs -- do not change between runs)")
    m.add_argument("--no-controls", dest="controls", action="store_false",
                   help="skip the controls (raw web, filter-only, human-only, oracle) and the comparison table")
    m.add_argument("--workdir", default="demo",
                   help="the demo's own git + DVC repo, made on first use (default: demo/)")
    add_params_args(m)
    m.set_defaults(func=_demo)


def _summary(result: dict) -> str:
    lines = []
    for name, r in result.items():
        if isinstance(r, dict) and "skipped" in r:
            lines.append(f"  {name:<22} {'skipped (unchanged)' if r['skipped'] else 'ran'}")
            if name == "gate":  # the verdict: what the round's tag and sourcing follow from
                lines.append(f"    {r.get('state')}: {r.get('reason')}")
        elif isinstance(r, dict) and name.startswith("round"):
            lines.append(f"{name}:")
            lines.append(_summary(r))
        elif name == "version" and r:
            lines.append(f"  version: dvc commit {len(r.get('dvc_committed', []))} stages, tag {r.get('tag')}")
    return "\n".join(lines)


def _run(args: argparse.Namespace) -> int:
    from flows.bootstrap import run_bootstrap

    res = run_bootstrap(args.params, args.overrides, round=args.round, workdir=args.workdir,
                        init_from=args.init_from, until=args.until)
    print(_summary(res))
    return 0


def _cycles(args: argparse.Namespace) -> int:
    from flows.cycles import run_cycles

    res = run_cycles(args.rounds, args.params, args.overrides, workdir=args.workdir, init_from=args.init_from,
                     start_round=args.start_round)
    print(_summary(res))
    if res.get("report"):
        print(f"report: {res['report']}")
    return 0


def _deploy(args: argparse.Namespace) -> int:
    from flows.deploy import deploy_nightly
    from vlp_core.cli import load_params_from_args

    params = load_params_from_args(args)
    dep = deploy_nightly(params, args.params, args.workdir, name=args.name, cron=args.cron, pool=args.pool,
                         overrides=args.overrides)
    pool = args.pool or params.orchestration.work_pool
    print(json.dumps({"deployment_id": str(dep), "name": f"vlp-nightly/{args.name}",
                      "cron": args.cron or params.orchestration.schedule_cron, "work_pool": pool,
                      "overrides": list(args.overrides)}))
    print(f"start a worker: prefect worker start --pool {pool}")
    return 0


def _demo(args: argparse.Namespace) -> int:
    from flows.demo import run_demo

    res = run_demo(args.params, args.overrides, workdir=args.workdir, rounds=args.rounds, port=args.port,
                   controls=args.controls)
    print(_summary(res))
    if res.get("table"):
        print("\nCapFilt on the synthetic web: 'pretrained' is round 0's base model (raw web + human), 'round k' "
              "is retrained on CapFilt's corpus of round k; each control gets round 0's retraining on its own "
              "corpus ('raw web': the pretrained model trained on, on the raw web, when retrain.init is continue):\n")
        print(res["table"])
        print(f"\n({args.workdir}/data/comparison/table.md, results.json)")
    rounds = sorted(k for k in res if k.startswith("round") and k[5:].isdigit())
    compare = (f"vlp versions diff {rounds[0]} {rounds[-1]}" if len(rounds) > 1
               else "vlp versions list; dvc metrics show")
    print(f"report: {res.get('report')}\ncompare: cd {args.workdir} && {compare}")
    return 0
