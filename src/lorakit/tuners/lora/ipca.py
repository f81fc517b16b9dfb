"""Incremental PCA over batches of row vectors: the top-k principal directions of all rows seen so far without keeping
them, as EVA needs for each layer's inputs (:mod:`lorakit.tuners.lora.eva`).

The update is the sequential Karhunen–Loève step of Ross et al. 2008 ("Incremental Learning for Robust Visual
Tracking", §3.1, the algorithm of scikit-learn's ``IncrementalPCA``). With n rows seen, running mean μ and the
current components ``V (k, d)`` with singular values ``s (k,)``, a new batch ``X (m, d)`` with mean x̄ gives::

    M = [ diag(s) V                              ]   (k, d)   what the past rows contribute, truncated to rank k
        [ X − x̄                                  ]   (m, d)   the new rows, centred on their own mean
        [ √(n·m / (n+m)) · (μ − x̄)               ]   (1, d)   the shift between the two means
    U' S' V'ᵀ = SVD(M),   V ← V'[:k],   s ← S'[:k]

On the first batch M is ``X − μ``. The per-feature mean and variance are updated exactly (Chan et al.'s parallel
formula, in float64), and the explained variance ratio of component i is ``s_i² / (n · Σ_j var_j)``.

Each SVD is by default a randomized one (``torch.svd_lowrank``, Halko et al. 2011, arXiv 0909.4061) with
``q = 2k`` columns, 4 subspace iterations and a fixed seed (42, in a forked RNG so the caller's random state is
untouched): a layer's data (tokens × hidden) is tall and only k directions are kept. These are PEFT's settings, so
the same data gives the same components. Signs are fixed so that each component's largest-magnitude entry is
positive (deterministic output, and the cosine similarity between steps is meaningful).
"""

from __future__ import annotations

import torch


class IncrementalPCA:
    """Top-``n_components`` principal directions of a stream of ``(m, d)`` batches.

    Attributes (after the first :meth:`partial_fit`):
        components_: ``(k, d)`` orthonormal rows, the principal directions, largest variance first.
        singular_values_: ``(k,)``; explained_variance_ratio_: ``(k,)`` share of the total variance per direction.
        mean_, var_: ``(d,)`` running per-feature mean and variance (float64); n_samples_seen_: rows so far.
    """

    def __init__(
        self, n_components: int, lowrank: bool = True, lowrank_q: int | None = None, lowrank_niter: int = 4, seed=42
    ) -> None:
        self.n_components = n_components
        self.lowrank = lowrank
        self.lowrank_q = 2 * n_components if lowrank_q is None else lowrank_q
        self.lowrank_niter = lowrank_niter
        self.seed = seed
        self.n_samples_seen_ = 0
        self.components_: torch.Tensor | None = None

    def _svd(self, m: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(S, Vᵀ)`` of ``m``, randomized with a fixed seed unless ``lowrank=False``."""
        if not self.lowrank:
            _, s, vh = torch.linalg.svd(m, full_matrices=False)
            return s, vh
        devices = [m.device] if m.device.type == "cuda" else []
        with torch.random.fork_rng(devices=devices):
            torch.manual_seed(self.seed)
            _, s, v = torch.svd_lowrank(m, q=self.lowrank_q, niter=self.lowrank_niter)
        return s, v.mH

    def _update_moments(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, int]:
        """Running mean and (population) variance with batch ``x`` included, both ``(d,)`` float64."""
        m = x.shape[0]
        total = self.n_samples_seen_ + m
        batch_sum = x.sum(dim=0, dtype=torch.float64)
        batch_mean = batch_sum / m
        centred = x - batch_mean  # float64
        batch_ss = centred.square().sum(dim=0) - centred.sum(dim=0).square() / m  # Σ (x − x̄)², compensated
        if self.n_samples_seen_ == 0:
            return batch_sum / total, batch_ss / total, total
        n = self.n_samples_seen_
        old_sum = self.mean_ * n
        ss = self.var_ * n + batch_ss + (n / m) / total * (old_sum / (n / m) - batch_sum).square()
        return (old_sum + batch_sum) / total, ss / total, total

    @torch.no_grad()
    def partial_fit(self, x: torch.Tensor) -> IncrementalPCA:
        """Fold a batch ``x (m, d)`` (m ≥ n_components) into the components."""
        x = x.detach().clone()
        if x.dtype not in (torch.float32, torch.float64):
            x = x.float()
        m = x.shape[0]
        if m < self.n_components:
            raise ValueError(f"a batch of {m} rows cannot give {self.n_components} components")
        mean, var, total = self._update_moments(x)
        if self.components_ is None:
            stacked = x.sub_(mean)  # in place: the rows keep their dtype
        else:
            batch_mean = x.mean(dim=0)
            x.sub_(batch_mean)
            shift = ((self.n_samples_seen_ / total) * m) ** 0.5 * (self.mean_ - batch_mean)  # float64
            stacked = torch.vstack((self.singular_values_.view(-1, 1) * self.components_, x, shift))
        s, vh = self._svd(stacked)
        vh = _sign_fixed(vh)
        k = self.n_components
        self.components_ = vh[:k]
        self.singular_values_ = s[:k]
        self.explained_variance_ratio_ = s[:k].square() / (var * total).sum()
        self.mean_, self.var_, self.n_samples_seen_ = mean, var, total
        return self


def _sign_fixed(vh: torch.Tensor) -> torch.Tensor:
    """Rows of ``vh`` flipped so that each one's largest-magnitude entry is positive."""
    peak = vh.abs().argmax(dim=1)
    signs = torch.sign(vh[torch.arange(vh.shape[0], device=vh.device), peak])
    return vh * signs.view(-1, 1)
