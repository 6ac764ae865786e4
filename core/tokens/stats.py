"""Statistics of a visual language: how exported token sequences use their vocabulary.

After "Analyzing the language of visual tokens" (Chan et al., 2024): unigram rank-frequency
with a fitted Zipf exponent, entropy in bits per token against log2 of the vocabulary, the
fraction of the vocabulary used, the conditional entropy of a token given its raster
predecessor, and the most frequent tokens. `TokenStats` accumulates counts shard by shard, so a
whole dataset never has to sit in memory; `plot_rank_frequency` draws the log-log curve.

A statistic that is undefined for the data (a Zipf fit of fewer than 2 used tokens, the
conditional entropy of sequences of one token) is NaN here and `null` in stats.json, which
core/files.py writes as strict JSON.
"""

from __future__ import annotations

import math
import os

import numpy as np

# Above this many (predecessor, token) cells the bigram table is kept sparse: a dense table
# for a 16384-code vocabulary would need 2 GiB.
_DENSE_CELLS = 1 << 24
_COMPACT_EVERY = 1 << 24  # Pending sparse pair codes merged once this many have piled up.


def entropy_bits(counts: np.ndarray) -> float:
    """Plug-in Shannon entropy (bits) of a histogram."""
    counts = np.asarray(counts, np.float64)
    total = counts.sum()
    if total <= 0:
        return 0.0
    p = counts[counts > 0] / total
    return float(-(p * np.log2(p)).sum())


def fit_zipf(counts: np.ndarray) -> dict:
    """Fits frequency(rank) ~ rank**-s to a histogram.

    `exponent`: maximum likelihood for a discrete power law truncated to the used ranks
    (1..n_used, ranked by observed count); unbiased by the noisy tail of rare tokens.
    `exponent_loglog`: slope of a least-squares line through log count vs log rank over the
    ranks seen at least 5 times, the fit most papers draw.
    """
    from scipy import optimize

    c = np.sort(np.asarray(counts)[np.asarray(counts) > 0])[::-1].astype(np.float64)
    if len(c) < 2:
        return {"exponent": float("nan"), "exponent_loglog": float("nan")}
    log_rank = np.log(np.arange(1, len(c) + 1))
    total, weighted = c.sum(), (c * log_rank).sum()

    def nll(s):  # -log likelihood / total, up to a constant
        return (s * weighted) / total + np.log(np.exp(-s * log_rank).sum())

    s = optimize.minimize_scalar(nll, bounds=(0.0, 8.0), method="bounded").x
    keep = c >= 5
    loglog = float("nan")
    if keep.sum() >= 2:
        loglog = -float(np.polyfit(log_rank[keep], np.log(c[keep]), 1)[0])
    return {"exponent": float(s), "exponent_loglog": loglog}


class TokenStats:
    """Accumulates unigram and raster-bigram counts of token sequences [N, L] in [0, vocab)."""

    def __init__(self, vocab_size: int):
        self.vocab_size = int(vocab_size)
        self.unigram = np.zeros(self.vocab_size, np.int64)
        self.num_sequences = 0
        self._dense = self.vocab_size**2 <= _DENSE_CELLS
        self._pairs = np.zeros(self.vocab_size**2 if self._dense else 0, np.int64)
        self._pair_keys = np.zeros(0, np.int64)  # sparse: sorted pair codes and their counts
        self._pair_counts = np.zeros(0, np.int64)
        self._pending: list[np.ndarray] = []

    def update(self, tokens: np.ndarray) -> None:
        """Adds sequences [N, L] (raster order for grids) of raw indices (no offset)."""
        tokens = np.asarray(tokens, np.int64)
        if tokens.ndim != 2:
            raise ValueError(f"TokenStats.update wants [N, L] token sequences, got {tokens.shape}")
        if tokens.size and (tokens.min() < 0 or tokens.max() >= self.vocab_size):
            raise ValueError(
                f"token ids outside [0, {self.vocab_size}): min {tokens.min()}, max "
                f"{tokens.max()}; remove the vocabulary offset and begin/end-of-image ids first"
            )
        self.num_sequences += len(tokens)
        self.unigram += np.bincount(tokens.reshape(-1), minlength=self.vocab_size)
        # Pair code predecessor * K + token, within each sequence (the first has none).
        codes = (tokens[:, :-1] * self.vocab_size + tokens[:, 1:]).reshape(-1)
        if self._dense:
            self._pairs += np.bincount(codes, minlength=len(self._pairs))
            return
        self._pending.append(codes)
        if sum(len(p) for p in self._pending) >= _COMPACT_EVERY:
            self._compact()

    def _compact(self) -> None:
        if not self._pending:
            return
        keys, inverse = np.unique(
            np.concatenate([self._pair_keys, *self._pending]), return_inverse=True
        )
        weights = np.concatenate([self._pair_counts, *(np.ones(len(p)) for p in self._pending)])
        self._pair_keys = keys
        self._pair_counts = np.bincount(inverse, weights=weights).astype(np.int64)
        self._pending = []

    def pair_counts(self) -> tuple[np.ndarray, np.ndarray]:
        """(pair codes predecessor * K + token, counts) of every observed raster bigram."""
        if self._dense:
            keys = np.flatnonzero(self._pairs)
            return keys, self._pairs[keys]
        self._compact()
        return self._pair_keys, self._pair_counts

    def conditional_entropy(self) -> float:
        """H(token | raster predecessor) = H(predecessor, token) - H(predecessor), in bits."""
        keys, counts = self.pair_counts()
        if not len(keys):
            return float("nan")
        predecessor = np.bincount(keys // self.vocab_size, weights=counts)
        return entropy_bits(counts) - entropy_bits(predecessor)

    def result(self, top_k: int = 20) -> dict:
        """Everything stats.json holds (see the module docstring)."""
        total = int(self.unigram.sum())
        used = int((self.unigram > 0).sum())
        h = entropy_bits(self.unigram)
        log2_vocab = math.log2(self.vocab_size)
        order = np.argsort(-self.unigram, kind="stable")[:top_k]
        zipf = fit_zipf(self.unigram)
        return {
            "num_sequences": self.num_sequences,
            "num_tokens": total,
            "vocab_size": self.vocab_size,
            "log2_vocab": log2_vocab,
            "entropy_bits": h,
            "entropy_fraction_of_log2_vocab": h / log2_vocab if log2_vocab > 0 else float("nan"),
            "perplexity": 2.0**h,
            "conditional_entropy_bits": self.conditional_entropy(),
            "vocab_used": used,
            "vocab_used_fraction": used / self.vocab_size,
            "zipf_exponent": zipf["exponent"],
            "zipf_exponent_loglog": zipf["exponent_loglog"],
            "top_tokens": [
                {
                    "token": int(t),
                    "count": int(self.unigram[t]),
                    "frequency": self.unigram[t] / total,
                }
                for t in order
                if self.unigram[t] > 0
            ],
        }


def summary(result: dict) -> str:
    """A short human-readable summary of `TokenStats.result()`."""
    top = ", ".join(f"{t['token']} ({100 * t['frequency']:.2f}%)" for t in result["top_tokens"][:5])
    return "\n".join(
        [
            f"visual language: {result['num_sequences']} sequences, {result['num_tokens']} tokens",
            f"  entropy {result['entropy_bits']:.3f} bits/token of log2(vocab) "
            f"{result['log2_vocab']:.3f} ({100 * result['entropy_fraction_of_log2_vocab']:.1f}%)"
            f", perplexity {result['perplexity']:.1f}",
            f"  given the raster predecessor: {result['conditional_entropy_bits']:.3f} bits/token",
            f"  vocabulary used: {result['vocab_used']} of {result['vocab_size']} "
            f"({100 * result['vocab_used_fraction']:.1f}%)",
            f"  Zipf exponent {result['zipf_exponent']:.3f} (MLE; log-log fit "
            f"{result['zipf_exponent_loglog']:.3f})",
            f"  most frequent: {top}",
        ]
    )


def plot_rank_frequency(counts: np.ndarray, result: dict, path: str) -> str:
    """Log-log rank-frequency curve with the fitted Zipf line, as a PNG (matplotlib Agg)."""
    import matplotlib

    matplotlib.use("Agg")  # No display on servers; must precede pyplot.
    import matplotlib.pyplot as plt

    c = np.sort(np.asarray(counts)[np.asarray(counts) > 0])[::-1].astype(np.float64)
    freq = c / max(c.sum(), 1.0)
    ranks = np.arange(1, len(c) + 1)
    fig, ax = plt.subplots(figsize=(5, 4), dpi=100)
    ax.loglog(ranks, freq, ".", markersize=3, label="tokens")
    s = result["zipf_exponent"]
    if len(c) >= 2 and np.isfinite(s):
        fitted = ranks**-s / (ranks**-s).sum()
        ax.loglog(ranks, fitted, "-", linewidth=1, label=f"Zipf fit, s = {s:.2f}")
    ax.set_xlabel("rank")
    ax.set_ylabel("frequency")
    ax.set_title(
        f"{result['entropy_bits']:.2f} of {result['log2_vocab']:.2f} bits/token, "
        f"{100 * result['vocab_used_fraction']:.0f}% of vocab used",
        fontsize=9,
    )
    ax.legend(fontsize=8)
    fig.subplots_adjust(left=0.2, bottom=0.12, right=0.97, top=0.92)  # tight_layout: 0.5 s
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    fig.savefig(path)
    plt.close(fig)
    return path
