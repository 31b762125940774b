"""Benchmark: `run_ingest` (the wrapper behind `vlp ingest`) against bare `img2dataset.download`.

Both download the same list of >= 5,000 URLs from the synthetic world served on 127.0.0.1,
with the same img2dataset settings (processes, threads, resize, hashing), in this one process
tree, alternated (wrapper, bare, bare, wrapper, ...) so drift hits both alike; img2dataset is
imported once before timing.  Prints the
images/s of each run, the medians and the ratio wrapper / bare (target >= 0.9).

    .venv/bin/python bench/ingest.py [--n-web 5000] [--rounds 3] [-S ingest.thread_count=16 ...]
"""
from __future__ import annotations

import argparse
import shutil
import statistics
import tempfile
import time
from pathlib import Path

import pyarrow.parquet as pq


def _bare(urls: Path, out: Path, params) -> int:
    import img2dataset

    from vlp_core.ingest.stage import img2dataset_kwargs

    img2dataset.download(url_list=str(urls), output_folder=str(out), input_format="parquet",
                         url_col="url", caption_col="caption", incremental_mode="incremental",  # fresh folder
                         **img2dataset_kwargs(params.ingest))
    return sum(pq.read_table(p, columns=["status"]).column("status").to_pylist().count("success")
               for p in out.glob("*.parquet"))


def _wrapper(urls: Path, out: Path, params) -> int:
    from vlp_core.ingest.stage import run_ingest

    return run_ingest(params, urls, out).counts.get("success", 0)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n-web", type=int, default=5000)
    ap.add_argument("--rounds", type=int, default=4)
    ap.add_argument("--keep", action="store_true", help="keep the temporary folder")
    ap.add_argument("-S", dest="overrides", action="append", default=[])
    args = ap.parse_args()

    from vlp_core.config import load_params
    from vlp_core.env import apply_offline_env
    from vlp_core.synthetic.make import run_synthetic_make
    from vlp_core.synthetic.server import serve_world, write_url_list

    apply_offline_env()
    import img2dataset  # noqa: F401  - pay the one-time import here, not inside the first timed run
    params = load_params("params.yaml", [
        f"synthetic.n_web={args.n_web}", "synthetic.n_human=10", "synthetic.n_test=10",
        "ingest.incremental=false", *args.overrides,
    ])
    root = Path(tempfile.mkdtemp(prefix="bench-ingest-"))
    t0 = time.perf_counter()
    run_synthetic_make(params, root / "world")
    print(f"world: {args.n_web} web URLs in {time.perf_counter() - t0:.1f} s; "
          f"processes={params.ingest.processes_count} threads={params.ingest.thread_count} "
          f"shard={params.ingest.number_sample_per_shard}")
    rates: dict[str, list[float]] = {"wrapper": [], "bare": []}
    with serve_world(root / "world") as srv:
        urls = write_url_list(root / "world", "web", srv.base_url, root / "web_urls.parquet")
        params = params.replace(**{"ingest.allowed_hosts": (srv.host_port,)})
        for r in range(args.rounds):
            for name, fn in (("wrapper", _wrapper), ("bare", _bare)) if r % 2 == 0 else (("bare", _bare), ("wrapper", _wrapper)):
                out = root / f"{name}_{r}"
                t = time.perf_counter()
                ok = fn(urls, out, params)
                dt = time.perf_counter() - t
                rates[name].append(ok / dt)
                print(f"round {r} {name:<8} {ok} images in {dt:6.2f} s = {ok / dt:7.1f} images/s", flush=True)
                shutil.rmtree(out, ignore_errors=True)
    w, b = statistics.median(rates["wrapper"]), statistics.median(rates["bare"])
    print(f"\nmedian images/s: vlp ingest (run_ingest) {w:.1f}, bare img2dataset.download {b:.1f}")
    print(f"ratio wrapper/bare = {w / b:.3f} (target >= 0.9)")
    if not args.keep:
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
