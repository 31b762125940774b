"""The ground-truth audit: ROC-AUC and detection on hand-computed cases."""
from __future__ import annotations

import pytest

from vlp_core.audit import detection, roc_auc


def test_roc_auc_hand_cases():
    assert roc_auc([True, True, False, False], [0.9, 0.8, 0.2, 0.1]) == 1.0
    assert roc_auc([True, True, False, False], [0.1, 0.2, 0.8, 0.9]) == 0.0
    # one swapped pair out of 4 pairs -> 3/4
    assert roc_auc([True, False, True, False], [0.9, 0.8, 0.7, 0.1]) == pytest.approx(0.75)
    # ties count half
    assert roc_auc([True, False], [0.5, 0.5]) == pytest.approx(0.5)
    assert roc_auc([True, True], [0.1, 0.2]) is None


def test_detection_precision_recall():
    d = detection(bad=[True, True, False, False], flagged=[True, False, True, False], badness=[1, 0, 0.5, 0])
    assert d["precision"] == pytest.approx(0.5)
    assert d["recall"] == pytest.approx(0.5)
    assert d["n_bad"] == 2 and d["n"] == 4
