"""Features of a CapFilt corpus: ITC image/text embeddings (optionally a timm backbone's pooled
features) and duplicate flags (exact by sha256, near by blocked cosine search).

* :mod:`~vlp_core.features.stage`: ``run_features``;
* :mod:`~vlp_core.features.dedup`: ``exact_duplicates``, ``near_duplicates`` (bounded memory).
"""
