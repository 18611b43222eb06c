"""Language identification for the optional ``quality.languages`` filter.

py3langid (langid.py's maintained fork: a naive Bayes model over byte n-grams, 140 languages, the
model inside the wheel, NumPy only) was chosen over fastText-based detectors because those fetch
their model from the network on first use, which these machines cannot do, and over lingua because
its wheel is ~100x larger for a filter that is off by default.
"""

from __future__ import annotations

import functools
from typing import Any

import polars as pl

# The start of a conversation decides its language; classifying 2 KB instead of 20 KB keeps the
# filter's cost per row flat.
SAMPLE_CHARS = 2000


@functools.cache
def _identifier() -> Any:
    from py3langid.langid import MODEL_FILE, LanguageIdentifier

    return LanguageIdentifier.from_model_file(MODEL_FILE)


def detect_languages(texts: pl.Series) -> pl.Series:
    """ISO 639-1 code of each text's language (null for a null or blank text)."""
    ident = _identifier()
    return pl.Series(
        [ident.classify(t[:SAMPLE_CHARS])[0] if t and t.strip() else None for t in texts.to_list()], dtype=pl.String
    )


def known_languages() -> set[str]:
    """The codes the model can answer."""
    return set(_identifier().nb_classes)
