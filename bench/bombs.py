"""Peak memory of img2dataset's download processes with decompression bombs in the URL list.

Serves, on 127.0.0.1, 40 ordinary 256 px JPEGs plus (unless --no-bombs) PNGs that are a few
hundred KB on the wire and 20000 x 20000 grey / 15000 x 15000 RGB once decoded, and ingests
them three ways, each in its own process so that its children's peak RSS is its own:

* ``normal``: the JPEGs only;
* ``limit``: JPEGs and bombs, with the default ``ingest.max_image_pixels`` (read from the header);
* ``no-limit``: JPEGs and bombs, with the limit set out of reach (what happened before it).

    python bench/bombs.py            # prints one table row per way, peak RSS of the download process
"""
from __future__ import annotations

import argparse
import io
import json
import resource
import struct
import subprocess
import sys
import tempfile
import threading
import zlib
from functools import partial
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def _bomb_png(path: Path, width: int, height: int, colour_type: int) -> None:
    """A real PNG of zeros (colour_type 0 grey, 2 RGB), compressed row by row."""
    channels = 3 if colour_type == 2 else 1

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    comp = zlib.compressobj(9)
    row = b"\x00" * (width * channels + 1)
    parts = [comp.compress(row) for _ in range(height)]
    data = b"".join(parts) + comp.flush()
    ihdr = struct.pack(">IIBBBBB", width, height, 8, colour_type, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", data) + chunk(b"IEND", b""))


def _make_site(root: Path) -> dict[str, list[str]]:
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(0)
    normal = []
    for i in range(40):
        buf = io.BytesIO()
        Image.fromarray(rng.integers(0, 255, (256, 256, 3), dtype=np.uint8)).save(buf, format="JPEG")
        (root / f"n{i}.jpg").write_bytes(buf.getvalue())
        normal.append(f"n{i}.jpg")
    bombs = []
    for i, (w, h, ct) in enumerate([(20000, 20000, 0), (15000, 15000, 2), (20000, 20000, 0), (15000, 15000, 2)]):
        _bomb_png(root / f"bomb{i}.png", w, h, ct)
        bombs.append(f"bomb{i}.png")
    return {"normal": normal, "bombs": bombs}


def _one(site: Path, base: str, names: list[str], limit: int, out: Path) -> None:
    from vlp_core.config import Params
    from vlp_core.ingest.stage import run_ingest

    lst = out.with_suffix(".txt")
    lst.write_text("".join(f"{base}/{n}\n" for n in names))
    params = Params().replace(**{"ingest.processes_count": 1, "ingest.thread_count": 4, "ingest.image_size": 64,
                                 "ingest.allowed_hosts": (base.split("//", 1)[1],),
                                 "ingest.max_image_pixels": limit, "ingest.timeout": 60})
    stats = run_ingest(params, lst, out)
    peak_mb = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024
    print(json.dumps({"peak_child_rss_mb": round(peak_mb, 1), "counts": stats.counts}))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--one", nargs=4, metavar=("SITE", "BASE", "WHICH", "LIMIT"), help=argparse.SUPPRESS)
    a = ap.parse_args()
    from vlp_core.env import apply_offline_env

    apply_offline_env()
    if a.one:
        site, base, which, limit = a.one
        names = json.loads((Path(site) / "names.json").read_text())
        chosen = names["normal"] + (names["bombs"] if which != "normal" else [])
        _one(Path(site), base, chosen, int(limit), Path(tempfile.mkdtemp()) / "out")
        return
    with tempfile.TemporaryDirectory() as tmp:
        site = Path(tmp) / "site"
        site.mkdir()
        names = _make_site(site)
        (site / "names.json").write_text(json.dumps(names))
        sizes = {n: (site / n).stat().st_size for n in names["bombs"]}
        print(f"bombs on the wire: {', '.join(f'{n} {s // 1024} KB' for n, s in sizes.items())}")
        class Quiet(SimpleHTTPRequestHandler):
            def log_message(self, *args):
                pass

        handler = partial(Quiet, directory=str(site))
        httpd = ThreadingHTTPServer(("127.0.0.1", 0), handler)
        threading.Thread(target=httpd.serve_forever, daemon=True).start()
        base = f"http://127.0.0.1:{httpd.server_address[1]}"
        print("| way | peak RSS of the download process (MB) | statuses |\n|---|---|---|")
        for which, limit in (("normal", 40_000_000), ("limit", 40_000_000), ("no-limit", 10**12)):
            res = subprocess.run([sys.executable, __file__, "--one", str(site), base, which, str(limit)],
                                 capture_output=True, text=True, cwd=REPO)
            line = [ln for ln in res.stdout.splitlines() if ln.startswith("{")]
            if res.returncode != 0 or not line:
                print(f"| {which} | failed (exit {res.returncode}) | {res.stderr.strip().splitlines()[-1:]} |")
                continue
            r = json.loads(line[-1])
            print(f"| {which} | {r['peak_child_rss_mb']} | {r['counts']} |")
        httpd.shutdown()


if __name__ == "__main__":
    main()
