"""Lexical matching: BM25 (``bm25s``) over the item texts, kept in step with the catalog.

Texts are tokenised here (lower case, alphanumeric runs, English stopwords dropped), so the
terms a result matched can be reported as its reason. ``bm25s`` has no incremental update, and
BM25's statistics (idf, mean length) depend on the whole corpus, so a changed catalog rebuilds
the index from the stored token ids (about 0.2 s for 12,000 products on a busy 2-core CPU).
"""

from __future__ import annotations

import re
from collections.abc import Sequence

import bm25s
import numpy as np
from bm25s.stopwords import STOPWORDS_EN

from shared.index import top_k

STOPWORDS = frozenset(STOPWORDS_EN)
_WORD = re.compile(r"[^\W_]+")


def tokenize(text: str) -> list[str]:
    """Lower-cased words of two or more characters, stopwords removed, order kept."""
    return [w for w in _WORD.findall(text.lower()) if len(w) > 1 and w not in STOPWORDS]


class Lexical:
    """A BM25 index over documents that can be replaced or appended."""

    def __init__(self, texts: Sequence[str]):
        self.vocab: dict[str, int] = {}
        self.docs: list[list[int]] = []
        self.set_docs(np.arange(len(texts)), texts)

    def _ids(self, text: str) -> list[int]:
        return [self.vocab.setdefault(word, len(self.vocab)) for word in tokenize(text)]

    def set_docs(self, rows: np.ndarray, texts: Sequence[str]) -> None:
        """Replace documents ``rows`` (or append them, in order, at the end) and rebuild."""
        for row, text in zip(rows, texts, strict=True):
            if row == len(self.docs):
                self.docs.append(self._ids(text))
            else:
                self.docs[row] = self._ids(text)
        self.bm25 = bm25s.BM25()
        self.bm25.index((self.docs, self.vocab), create_empty_token=False, show_progress=False)
        self.doc_freq = np.diff(self.bm25.scores["indptr"])  # documents holding each word

    def scores(self, query: str) -> np.ndarray:
        """BM25 score of every document for ``query`` (zeros when no query word is known).

        Words in more than half of the documents are skipped: their idf is about zero (under
        1e-4 for a word in every document), and their long posting lists would dominate the
        time of a query on a large catalog ("beauty" is in every product of Amazon Beauty).
        """
        ids = [self.vocab[w] for w in tokenize(query)
               if w in self.vocab and self.doc_freq[self.vocab[w]] <= len(self.docs) / 2]
        if not ids:
            return np.zeros(len(self.docs), dtype=np.float32)
        return self.bm25.get_scores_from_ids(ids)

    def top(self, scores: np.ndarray, k: int, exclude: np.ndarray) -> np.ndarray:
        """The ``k`` best-scoring documents with a positive score, outside ``exclude``."""
        matched = np.flatnonzero(scores > 0)
        matched = matched[~np.isin(matched, exclude)]
        return matched[top_k(scores[matched], k)]

    def matched_terms(self, query: str, row: int) -> list[str]:
        """The query words that occur in document ``row``, in query order."""
        words = set(self.docs[row])
        return [w for w in dict.fromkeys(tokenize(query)) if self.vocab.get(w) in words]
