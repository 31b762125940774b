"""CapFilt: caption every web image, score and filter every candidate text (BLIP's bootstrap).

Modules, one job each:

* :mod:`~vlp_core.capfilt.backend`: model folders (vlp checkpoints, local HF BLIP folders)
  behind one interface, and :class:`ImagePass` (one vision pass per distinct encoder);
* :mod:`~vlp_core.capfilt.fastmed`: the SDPA inference path over BLIP's text weights;
* :mod:`~vlp_core.capfilt.captioner`: :class:`Captioner` (nucleus / beam / greedy);
* :mod:`~vlp_core.capfilt.filter`: :class:`ItmFilter` (ITC + ITM, optional ITC pre-screen);
* :mod:`~vlp_core.capfilt.stage`: ``run_capfilt`` / ``run_capfilt_shard`` /
  ``list_capfilt_shards`` / ``calibrate_threshold`` (the stage, resumable per shard);
* :mod:`~vlp_core.capfilt.rethreshold`: new thresholds on stored scores (DuckDB);
* :mod:`~vlp_core.capfilt.quality`: precision / recall / ROC-AUC against a ground truth
  (evaluation and benchmarks only).

Heavy imports (torch, transformers) happen inside these modules, not here.
"""
