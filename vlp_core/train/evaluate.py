"""``run_evaluate``: retrieval (BLIP's protocol), ITM accuracy and captioning on a test set.

* **Retrieval**, as BLIP's ``evaluation()``: rank every (image, text) pair by ITC similarity,
  then re-rank each query's top ``evaluate.k_test`` candidates by ITM logit + ITC similarity;
  candidates outside the top k keep a score of -100.  Reported as TR (image -> text) and IR
  (text -> image) R@1/5/10 in percent, ``r1_mean`` (mean of TR and IR R@1), ``r_mean``
  (BLIP's mean of all six) and the chance level of R@1.
* **Semantic recall**: several test images may share an identical caption (the synthetic
  world draws from a closed vocabulary).  A text counts as correct for an image when it is
  the same string (case and punctuation ignored) as one of that image's captions, so
  retrieving an image's twin is not a miss.  Documented in ``metrics.json`` as
  ``recall: semantic``.
* **ITM accuracy** (``itm_acc``): each test pair against one hard negative, the text with the
  highest ITC similarity among the image's wrong texts; the ITM head must give the positive
  p(match) > 0.5 and the negative <= 0.5.
* **Captioning**: greedy (or beam) captions with ``capfilt.prompt``, scored with BLEU-4 and
  CIDEr against the test captions (prompt removed).  A model that does not generate (ViLBERT:
  ``generates = False``) gets ``captioning: none`` instead, and retrieval's ITC stage is its
  dual-encoder head, its ITM its alignment head (:mod:`vlp_core.models.vilbert`).
* **Ground truth** (synthetic world only; joined on the URL *path*): ``caption_acc`` (all
  stated attributes true) and per attribute, plus ``itm_acc_swap``: ITM accuracy against a
  negative caption of the same scene with one attribute swapped.

Writes ``out_dir/metrics.json`` and ``out_dir/captions.parquet`` (url, reference, generated).
"""
from __future__ import annotations

import time
from pathlib import Path
from typing import Any, Optional, Sequence

import numpy as np
import pyarrow as pa
import torch
from tqdm import tqdm

from vlp_core.config import Params
from vlp_core.io import write_json, write_parquet
from vlp_core.models import BlipMED
from vlp_core.schema import C
from vlp_core.synthetic import world
from vlp_core.synthetic.truth import load_ground_truth, url_path
from vlp_core.train import metrics as M
from vlp_core.train.data import Source, decode_pairs, load_pairs, parse_source
from vlp_core.train.loop import TrainError, set_entry_threads

METRICS_FILE = "metrics.json"
CAPTIONS_FILE = "captions.parquet"


# --------------------------------------------------------------------------- model calls
@torch.no_grad()
def encode_images(model, images: np.ndarray, batch_size: int, device: torch.device):
    """-> (image token embeddings (N, T, D) on CPU, normalised ITC features (N, d))."""
    embeds, feats = [], []
    for s in tqdm(range(0, len(images), batch_size), desc="images", disable=None, leave=False):
        px = model.preprocess(images[s:s + batch_size]).to(device)
        emb = model.encode_image(px)  # (B, T, D)
        embeds.append(emb.float().cpu())
        feats.append(model.image_feat(emb).float().cpu())
    return torch.cat(embeds), torch.cat(feats)


@torch.no_grad()
def encode_texts(model, texts: Sequence[str], batch_size: int, device: torch.device) -> torch.Tensor:
    """-> normalised ITC text features (N, d)."""
    feats = []
    for s in tqdm(range(0, len(texts), batch_size), desc="texts", disable=None, leave=False):
        feats.append(model.text_feat(list(texts[s:s + batch_size])).float().cpu())
    return torch.cat(feats)


@torch.no_grad()
def itm_scores(model, image_embeds: torch.Tensor, texts: Sequence[str], batch_size: int,
               device: torch.device) -> tuple[np.ndarray, np.ndarray]:
    """ITM (logit of "match", p(match)) for each (image_embeds[i], texts[i]) pair."""
    logits, probs = [], []
    for s in range(0, len(texts), batch_size):
        emb = image_embeds[s:s + batch_size].to(device)
        lg = model.itm_logits(emb, list(texts[s:s + batch_size])).float().cpu()  # (B, 2)
        logits.append((lg[:, 1]).numpy())
        probs.append(torch.softmax(lg, dim=-1)[:, 1].numpy())
    if not logits:
        return np.zeros(0), np.zeros(0)
    return np.concatenate(logits), np.concatenate(probs)


@torch.no_grad()
def generate_captions(model, images: np.ndarray, params: Params, device: torch.device) -> list[str]:
    """Greedy (or beam) captions, prompt included (as BLIP's generate returns them)."""
    cp, ep = params.capfilt, params.evaluate
    out: list[str] = []
    for s in tqdm(range(0, len(images), ep.batch_size), desc="captions", disable=None, leave=False):
        px = model.preprocess(images[s:s + ep.batch_size]).to(device)
        out.extend(model.generate(px, sample=False, num_beams=cp.num_beams if ep.caption_decode == "beam" else 1,
                                  max_length=cp.max_length, min_length=cp.min_length, prompt=cp.prompt))
    return out


def strip_prompt(caption: str, prompt: str) -> str:
    p = prompt.strip().lower()
    c = caption.strip()
    return c[len(p):].strip() if p and c.lower().startswith(p) else c


# --------------------------------------------------------------------------- retrieval
def rerank_scores(sim: torch.Tensor, texts: Sequence[str], k: int,
                  model, image_embeds: torch.Tensor, i2t: bool, batch_size: int, device: torch.device) -> np.ndarray:
    """BLIP's protocol for one direction.  ``sim``: (n_query, n_cand) ITC similarity.
    Returns (n_query, n_cand) scores: -100 outside each query's ITC top k, else ITM logit +
    ITC similarity."""
    n_q, n_c = sim.shape
    k = min(k, n_c)
    top_sim, top_idx = sim.topk(k, dim=1)  # (n_q, k)
    if i2t:  # query = image i, candidates = texts
        img_rows = torch.arange(n_q).repeat_interleave(k)
        cand_texts = [texts[j] for j in top_idx.reshape(-1).tolist()]
    else:  # query = text j, candidates = images
        img_rows = top_idx.reshape(-1)
        cand_texts = [texts[j] for j in range(n_q) for _ in range(k)]
    logit, _ = itm_scores(model, image_embeds[img_rows], cand_texts, batch_size, device)
    score = np.full((n_q, n_c), -100.0, dtype=np.float64)
    np.put_along_axis(score, top_idx.numpy(), logit.reshape(n_q, k) + top_sim.numpy(), axis=1)
    return score


def _truth_by_url(ground_truth: str | Path) -> dict[str, dict[str, Any]]:
    path = Path(ground_truth)
    table = load_ground_truth(path.parent if path.suffix == ".parquet" else path)
    return {url_path(r[C.URL]): r for r in table.select([C.URL, C.TRUE_CAPTION, C.SCENE]).to_pylist()}


def _swapped_negatives(scenes: Sequence[str], seed: int) -> list[str]:
    """A caption of each scene with exactly one attribute swapped (seeded)."""
    out = []
    for i, js in enumerate(scenes):
        rng = np.random.default_rng([seed, 4242, i])
        wrong, _ = world.corrupt_attribute(world.Scene.from_json(js), rng)
        out.append(world.caption(wrong, rng))
    return out


def swap_accuracy(model, image_embeds: torch.Tensor, scenes: Sequence[str], true_captions: Sequence[str], seed: int,
                  batch_size: int, device: torch.device) -> float:
    """``itm_acc_swap``: ITM accuracy of each image's true caption against a caption of the same
    scene with one attribute swapped (:func:`_swapped_negatives`, seeded with ``seed``)."""
    swapped = _swapped_negatives(scenes, seed)
    _, sp = itm_scores(model, image_embeds, true_captions, batch_size, device)
    _, sn = itm_scores(model, image_embeds, swapped, batch_size, device)
    return M.binary_accuracy(sp, sn)


def relation_reversed_captions(scenes: Sequence[str], seed: int) -> tuple[list[int], list[str], list[str], list[str]]:
    """For the two-object scenes among ``scenes``: (their indices, a true caption, the same caption
    with only the relation word reversed, the same caption with the two objects traded), seeded --
    the three drawn with one generator state, so they share template and words."""
    idx, true, rev, traded = [], [], [], []
    for i, js in enumerate(scenes):
        sc = world.Scene.from_json(js)
        if sc.single:
            continue
        variants = (sc, world.Scene(sc.objects, world.INVERSE[sc.relation], sc.background),
                    world.Scene((sc.objects[1], sc.objects[0]), sc.relation, sc.background))
        t, r, x = (world.caption(v, np.random.default_rng([seed, 77, i])) for v in variants)
        idx.append(i)
        true.append(t)
        rev.append(r)
        traded.append(x)
    return idx, true, rev, traded


def relation_accuracy(model, image_embeds: torch.Tensor, scenes: Sequence[str], seed: int, batch_size: int,
                      device: torch.device) -> Optional[float]:
    """``itm_acc_relation``: ITM accuracy of a true caption of each two-object scene against the same
    caption with the relation reversed -- half with the relation word changed ("left of" -> "right
    of"), half with the two objects traded -- the one error :func:`swap_accuracy` rarely tests
    (a quarter of its negatives change the relation, a third of those reverse it).  None without
    two-object scenes."""
    idx, true, rev, traded = relation_reversed_captions(scenes, seed)
    if not idx:
        return None
    neg = [r if k % 2 == 0 else x for k, (r, x) in enumerate(zip(rev, traded))]
    emb = image_embeds[idx]
    _, sp = itm_scores(model, emb, true, batch_size, device)
    _, sn = itm_scores(model, emb, neg, batch_size, device)
    return M.binary_accuracy(sp, sn)


def run_swap_accuracy(params: Params, model_dir: str | Path, test_source: Source | str,
                      ground_truth: str | Path) -> dict[str, Any]:
    """Only the ground-truth ITM accuracies (``itm_acc_swap`` as :func:`run_evaluate` computes it,
    ``itm_acc_relation``, ``n_ground_truth``), for a model that is not evaluated in full -- a round's filter, whose
    ITM head CapFilt uses (the same test rows, negatives and threshold as ``run_evaluate``)."""
    set_entry_threads()
    ep = params.evaluate
    if not Path(model_dir).exists():
        raise TrainError(f"{model_dir}: model folder not found")
    source = parse_source(test_source) if isinstance(test_source, (str, Path)) else test_source
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    model = BlipMED.from_pretrained(model_dir).to(device).eval()
    data = decode_pairs(load_pairs([source]), int(model.config.image_size))
    urls = data.image_urls()
    truth = _truth_by_url(ground_truth)
    rows = [i for i, u in enumerate(urls) if u is not None and url_path(u) in truth]
    out: dict[str, Any] = {"n_ground_truth": len(rows), "itm_acc_swap": None, "itm_acc_relation": None,
                           "settings": {"swap_seed": params.pretrain.seed}}
    if rows:
        img_embeds, _ = encode_images(model, data.images[rows], ep.batch_size, device)
        scenes = [truth[url_path(urls[i])][C.SCENE] for i in rows]
        pos_texts = [truth[url_path(urls[i])][C.TRUE_CAPTION] for i in rows]
        out["itm_acc_swap"] = swap_accuracy(model, img_embeds, scenes, pos_texts, params.pretrain.seed,
                                            ep.batch_size, device)
        out["itm_acc_relation"] = relation_accuracy(model, img_embeds, scenes, params.pretrain.seed,
                                                    ep.batch_size, device)
    return out


def evaluation_settings(params: Params) -> dict[str, Any]:
    """Every setting that changes the numbers :func:`run_evaluate` writes (``batch_size`` does
    not).  ``metrics.json`` stores it under ``settings``; a stored file is reused only when it
    matches (see :func:`vlp_core.comparison.same_evaluation`)."""
    cp, ep = params.capfilt, params.evaluate
    s: dict[str, Any] = {"k_test": ep.k_test, "caption_decode": ep.caption_decode, "prompt": cp.prompt,
                         "max_length": cp.max_length, "min_length": cp.min_length,
                         "swap_seed": params.pretrain.seed}
    if ep.caption_decode == "beam":
        s["num_beams"] = cp.num_beams
    return s


def run_evaluate(params: Params, model_dir: str | Path, test_source: Source | str, out_dir: str | Path,
                 ground_truth: Optional[str | Path] = None, root: str | Path = ".") -> dict[str, Any]:
    """Evaluate the model at ``model_dir`` on ``test_source`` (a manifest, corpus or world
    URL list, see :func:`vlp_core.train.data.load_pairs`; its shard references relative to the
    work dir ``root``); returns and writes the metrics."""
    set_entry_threads()
    t0 = time.perf_counter()
    ep = params.evaluate
    out_dir = Path(out_dir)
    if not Path(model_dir).exists():
        raise TrainError(f"{model_dir}: model folder not found")
    source = parse_source(test_source) if isinstance(test_source, (str, Path)) else test_source
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    model = BlipMED.from_pretrained(model_dir).to(device).eval()
    generates = getattr(model, "generates", True)  # ViLBERT has no decoder: no captioning metrics
    data = decode_pairs(load_pairs([source], root), int(model.config.image_size))
    if len(data) < 2:
        raise TrainError(f"{source[0]}: fewer than 2 usable test pairs")
    texts = data.texts
    text_image = data.image_idx  # (n_txt,) image of each text
    n_img = len(data.images)
    image_caps: list[list[str]] = [[] for _ in range(n_img)]
    for t, i in zip(texts, text_image.tolist()):
        image_caps[i].append(t)

    # ---- retrieval
    img_embeds, img_feat = encode_images(model, data.images, ep.batch_size, device)
    txt_feat = encode_texts(model, texts, ep.batch_size, device)
    sim_i2t = img_feat @ txt_feat.T  # (n_img, n_txt)
    correct = M.same_caption_matrix(image_caps, texts)  # (n_img, n_txt) semantic
    score_i2t = rerank_scores(sim_i2t, texts, ep.k_test, model, img_embeds, True, ep.batch_size, device)
    score_t2i = rerank_scores(sim_i2t.T.contiguous(), texts, ep.k_test, model, img_embeds, False,
                              ep.batch_size, device)
    metrics: dict[str, Any] = {"n_images": n_img, "n_texts": len(texts), "k_test": ep.k_test,
                               "caption_decode": ep.caption_decode, "recall": "semantic",
                               "settings": evaluation_settings(params)}
    metrics.update(M.retrieval_metrics(score_i2t, score_t2i, correct))
    metrics["itc_r1_mean"] = (M.recall_at_k(sim_i2t.numpy(), correct, (1,))[1]
                              + M.recall_at_k(sim_i2t.T.numpy(), correct.T, (1,))[1]) / 2.0
    metrics["chance_tr_r1"] = M.chance_recall(correct, 1)
    metrics["chance_ir_r1"] = M.chance_recall(correct.T, 1)

    # ---- ITM accuracy vs the ITC-hardest wrong text of each pair's image
    masked = sim_i2t.numpy().copy()
    masked[correct] = -np.inf
    hard = masked.argmax(axis=1)  # (n_img,)
    pos_emb = img_embeds[torch.from_numpy(text_image)]
    _, p_pos = itm_scores(model, pos_emb, texts, ep.batch_size, device)
    has_neg = ~np.all(correct, axis=1)
    neg_rows = np.flatnonzero(has_neg[text_image])
    neg_texts = [texts[hard[text_image[r]]] for r in neg_rows]
    _, p_neg = itm_scores(model, img_embeds[torch.from_numpy(text_image[neg_rows])], neg_texts, ep.batch_size, device)
    metrics["itm_acc"] = M.binary_accuracy(p_pos, p_neg)
    metrics["itm_pos_mean"] = float(np.mean(p_pos))
    metrics["itm_neg_mean"] = float(np.mean(p_neg)) if len(p_neg) else None

    # ---- captioning (a family that generates; else `captioning: none` and no caption metrics)
    generated: list[Optional[str]] = [None] * n_img
    if generates:
        generated = generate_captions(model, data.images, params, device)
        hyps = {str(i): strip_prompt(g, params.capfilt.prompt) for i, g in enumerate(generated)}
        refs = {str(i): caps for i, caps in enumerate(image_caps)}
        metrics["bleu4"] = M.bleu4(refs, hyps)
        metrics["cider"] = M.cider(refs, hyps)
    else:
        metrics["captioning"] = "none"
    urls = data.image_urls()

    # ---- ground truth (synthetic world only)
    if ground_truth is not None:
        truth = _truth_by_url(ground_truth)
        rows = [i for i, u in enumerate(urls) if u is not None and url_path(u) in truth]
        metrics["n_ground_truth"] = len(rows)
        if rows:
            scenes = [truth[url_path(urls[i])][C.SCENE] for i in rows]
            if len(rows) == n_img:  # every test image has its scene: retrieval judged by the scene too
                metrics.update(M.scene_recall(score_i2t, score_t2i, correct, M.scene_matrix(texts, scenes)))
            if generates:
                metrics.update(M.caption_accuracy([generated[i] for i in rows], scenes))
            pos_texts = [truth[url_path(urls[i])][C.TRUE_CAPTION] for i in rows]
            idx = torch.tensor(rows, dtype=torch.long)
            metrics["itm_acc_swap"] = swap_accuracy(model, img_embeds[idx], scenes, pos_texts, params.pretrain.seed,
                                                    ep.batch_size, device)

    metrics["seconds"] = round(time.perf_counter() - t0, 3)
    write_parquet(pa.table({C.URL: pa.array(urls, pa.string()),
                            "reference": pa.array([c[0] for c in image_caps], pa.string()),
                            "generated": pa.array(generated, pa.string())}), out_dir / CAPTIONS_FILE)
    write_json(metrics, out_dir / METRICS_FILE)
    return metrics
