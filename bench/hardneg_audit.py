"""Issue 16 probe: what the compositional hard negatives (vlp_core/train/hardneg.py) say, checked
against the synthetic world's ground truth.  No training; seconds.  Not a test.

    .venv/bin/python bench/hardneg_audit.py --run <bench/cycle.py run folder> --seed 0

It builds :class:`~vlp_core.train.hardneg.HardNegatives` from the seed's human captions, as the filter
fine-tune does, makes one negative per caption (``--draws`` times, seeded), and scores every negative
against its image's scene (:func:`vlp_core.synthetic.world.check_caption`):

- **false negative**: the negative is still true of the image (nothing it states is wrong), e.g.
  "big" replaced by "large".  ITM is then taught that a right caption is wrong.
- **relation wrong**: the negative gets the relation (or the single object's position) wrong.

Each setting is one row: word swaps/replacements only, with the world's synonym groups
(``synonyms``), and with phrase swaps (``phrase_swaps``).
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from vlp_core.env import apply_offline_env  # noqa: E402


def audit(captions, scenes, settings: dict, draws: int, seed: int) -> dict:
    """Share of negatives made, false, relation-wrong, per kind (same words = a swap, else a replacement)."""
    import numpy as np

    from vlp_core.synthetic import world as W
    from vlp_core.train.hardneg import HardNegatives

    hn = HardNegatives(captions, **settings)
    rng = np.random.default_rng([seed, 0x4155])
    n = made = false = rel = 0
    kinds = {"swap": [0, 0, 0], "replace": [0, 0, 0]}  # made, false, relation wrong
    for _ in range(draws):
        for text, scene in zip(captions, scenes):
            n += 1
            neg = hn.negative(text, rng)
            if neg is None:
                continue
            made += 1
            check = W.check_caption(neg, scene)
            is_false = all(v is not False for k, v in check.items() if k != "all")
            is_rel = check["relation"] is False
            false += is_false
            rel += is_rel
            k = kinds["swap" if sorted(neg.lower().split()) == sorted(text.lower().split()) else "replace"]
            k[0] += 1
            k[1] += is_false
            k[2] += is_rel
    pct = lambda a, b: round(100.0 * a / b, 1) if b else None  # noqa: E731
    return {"captions": n, "negatives_pct": pct(made, n), "false_pct": pct(false, made),
            "relation_wrong_pct": pct(rel, made),
            **{f"{name}_{what}": v for name, (m, f, r) in kinds.items()
               for what, v in (("share_pct", pct(m, made)), ("false_pct", pct(f, m)), ("relation_wrong_pct", pct(r, m)))}}


def main() -> int:
    apply_offline_env()
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--run", required=True, help="a bench/cycle.py run folder (holding seed<k>/)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--draws", type=int, default=5, help="negatives drawn per caption")
    a = ap.parse_args()

    import json

    import pyarrow.parquet as pq

    from vlp_core.layout import Layout
    from vlp_core.schema import C
    from vlp_core.synthetic import world as W
    from vlp_core.synthetic.truth import url_path
    from vlp_core.train.evaluate import _truth_by_url

    layout = Layout.at(Path(a.run).resolve() / f"seed{a.seed}")
    truth = _truth_by_url(layout.world / "ground_truth.parquet")
    man = pq.read_table(layout.manifest("human")).to_pylist()
    rows = [(r[C.CAPTION], truth[url_path(r[C.URL])][C.SCENE]) for r in man
            if r.get(C.URL) and r.get(C.CAPTION) and url_path(r[C.URL]) in truth]
    captions, scenes = [t for t, _ in rows], [s for _, s in rows]
    groups = W.synonym_groups()
    for name, settings in (("words only", {}), ("synonyms", {"synonyms": groups}),
                           ("phrase_swaps 1", {"phrase_share": 1.0}),
                           ("phrase_swaps 1 + synonyms", {"phrase_share": 1.0, "synonyms": groups})):
        print(f"{name}: {json.dumps(audit(captions, scenes, settings, a.draws, a.seed))}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
