"""What a peer tells the planner its originator work costs (``meshd.serve.daemon.origin_layers``)."""

from __future__ import annotations

import logging

import pytest

from meshd.serve.daemon import origin_layers
from models.drafters import drafter_factory


@pytest.mark.parametrize("drafter", ["auto", "ngram"])
def test_the_originator_work_is_measured_with_the_default_drafter(embedded_source, embedded, drafter, caplog):
    """The default drafter (the shipped head with n-gram lookup) drafts in the measurement. It once
    raised there (the features it was given covered the root too), the daemon logged a warning and
    published 0 layers, and the origin-aware split never moved a layer off an originating peer."""
    factory = drafter_factory(drafter, embedded, source=embedded_source)
    with caplog.at_level(logging.INFO, logger="meshd"):
        layers = origin_layers(embedded_source, embedded, factory, "fp32", "fp32")
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING], caplog.text
    # an LM head over the vocabulary of 49,152 and a 3-level draft cost more than one decoder layer
    assert layers > 1.0, caplog.text
