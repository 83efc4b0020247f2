"""Lexical matching: BM25 (``bm25s``) over the item texts, kept in step with the catalog.

Texts are tokenised here (lower case, alphanumeric runs, English stopwords dropped), so the
terms a result matched can be reported as its reason. ``bm25s`` has no incremental update, and
BM25's statistics (idf, mean length) depend on the whole corpus, so a changed catalog builds a
new index from the stored token ids (about 0.2 s for 12,000 products on a busy 2-core CPU), while
searches keep using the old one: an index never changes once built.
"""

from __future__ import annotations

import copy
import re
from collections.abc import Sequence

import bm25s
import numpy as np
from bm25s.stopwords import STOPWORDS_EN

from server.serving.index import top_k

STOPWORDS = frozenset(STOPWORDS_EN)
BLOCK = 256  # documents per block of the pre-filter of Lexical.top
_WORD = re.compile(r"[^\W_]+")


def tokenize(text: str) -> list[str]:
    """Lower-cased words of two or more characters, stopwords removed, order kept."""
    return [w for w in _WORD.findall(text.lower()) if len(w) > 1 and w not in STOPWORDS]


class Lexical:
    """A BM25 index over documents; a changed catalog gets a new index (:meth:`with_docs`)."""

    def __init__(self, texts: Sequence[str]):
        self.vocab: dict[str, int] = {}
        self.docs = [self._ids(text) for text in texts]
        self._index()

    def _ids(self, text: str) -> list[int]:
        return [self.vocab.setdefault(word, len(self.vocab)) for word in tokenize(text)]

    def _index(self) -> None:
        """Build BM25 from ``docs`` and ``vocab`` (the slow part of a change)."""
        self.bm25 = bm25s.BM25()
        self.bm25.index((self.docs, self.vocab), create_empty_token=False, show_progress=False)
        self.doc_freq = np.diff(self.bm25.scores["indptr"])  # documents holding each word

    def with_docs(self, rows: np.ndarray, texts: Sequence[str]) -> Lexical:
        """A new index with documents ``rows`` replaced (or appended, in order, at the end);
        this one is left as it was, for the readers still using it (copy-on-write)."""
        out = copy.copy(self)
        out.vocab, out.docs = dict(self.vocab), list(self.docs)
        for row, text in zip(rows, texts, strict=True):
            if row == len(out.docs):
                out.docs.append(out._ids(text))
            else:
                out.docs[row] = out._ids(text)
        out._index()
        return out

    def scores(self, query: str) -> np.ndarray:
        """BM25 score of every document for ``query`` (zeros when no query word is known).

        The sum of the words' precomputed BM25 terms, as ``bm25s.BM25.get_scores_from_ids``
        (same floats), one vectorised add per word: that is 10 to 20 times faster than its
        ``np.add.at`` (numba, its fast path, is not a dependency here). Words in more than half
        of the documents are skipped: their idf is about zero (under 1e-4 for a word in every
        document), and their long posting lists would dominate the time of a query on a large
        catalog ("beauty" is in every product of Amazon Beauty).
        """
        matrix = self.bm25.scores  # word -> (documents, their BM25 term): a CSC matrix
        scores = np.zeros(len(self.docs), dtype=np.float32)
        for word in tokenize(query):
            index = self.vocab.get(word)
            if index is None or self.doc_freq[index] > len(self.docs) / 2:
                continue
            start, end = matrix["indptr"][index], matrix["indptr"][index + 1]
            scores[matrix["indices"][start:end]] += matrix["data"][start:end]
        return scores

    def top(self, scores: np.ndarray, k: int, exclude: np.ndarray) -> np.ndarray:
        """The ``k`` best-scoring documents with a positive score, outside ``exclude``.

        On a large catalog most documents match some query word (400,000 of a million for a
        typical query here); only those that can be among the ``k + len(exclude)`` best are
        ranked: the ones scoring at least as many-th best of the maxima of blocks of
        :data:`BLOCK` documents (each of those blocks holds such a score). On a catalog of
        fewer blocks than that, every matching document is ranked.
        """
        wanted = k + len(exclude)
        floor = 0.0
        if len(scores) > wanted * BLOCK:
            maxima = np.maximum.reduceat(scores, np.arange(0, len(scores), BLOCK))
            floor = np.partition(maxima, -wanted)[-wanted]
        matched = np.flatnonzero(scores >= floor if floor > 0 else scores > 0)
        matched = matched[~np.isin(matched, exclude)]
        return matched[top_k(scores[matched], k)]

    def matched_terms(self, query: str, row: int) -> list[str]:
        """The query words that occur in document ``row``, in query order."""
        words = set(self.docs[row])
        return [w for w in dict.fromkeys(tokenize(query)) if self.vocab.get(w) in words]
