"""Dual-codebook quantizer with one shared index (TokenFlow, Qu et al. 2024, arXiv:2412.03069).

Two codebooks of the same size K: a semantic one (`semantic_code_dim`, 32 in TokenFlow) and a
pixel one (`pixel_code_dim`, 8). Each branch projects its encoder output into its code space
(a linear in-projection, as the VQ's `code_dim`) and l2-normalises it; codebook rows are
l2-normalised too. One index per vector,

    i* = argmin_i  d_sem(i) + w * d_pix(i),   d(i) = ||z / |z| - c_i / |c_i| ||^2,

with w = `pixel_weight` (TokenFlow's w_dis, 1.0 by default), and BOTH codebooks are read at i*.
Because d_sem(i) + w d_pix(i) = || [z_sem, sqrt(w) z_pix] - [c_sem_i, sqrt(w) c_pix_i] ||^2,
the search is tokenizers/vq.py's chunked nearest-code search over the concatenated vectors: the
same O(N * chunk) memory for large K.

Losses in code space, where z and the codes q are l2-normalised per branch. By default
(`loss_average='concatenated'`) they are TokenFlow's (ByteFlow-AI/TokenFlow,
tokenflow/tokenizer/vq_model.py, VectorQuantizer.forward): ONE mean over the concatenated
[semantic, pixel] code of semantic_code_dim + pixel_code_dim values per token,

    codebook = codebook_weight * mean_{N x (d_sem + d_pix)} (q - sg(z))^2     (key 'codebook'),
    commitment = beta * mean_{N x (d_sem + d_pix)} (sg(q) - z)^2        (key 'commitment').

`loss_average='per_branch'` (this codebase's earlier form) takes one mean per branch instead,
keys 'codebook_semantic', 'commitment_semantic', 'codebook_pixel', 'commitment_pixel': with 32-d
and 8-d codes that weights the semantic terms (32 + 8) / 32 = 1.25x and the pixel terms
(32 + 8) / 8 = 5x relative to TokenFlow's. Either way the per-branch code-space MSEs are also
reported as stats ('code_mse_semantic', 'code_mse_pixel'; unweighted, no gradient).
`pixel_weight` (w) only enters the search, as in TokenFlow, not the losses.

`quantized` is the straight-through pair, out-projected to each branch's input width and
concatenated: [..., semantic_dim + pixel_dim] (use `split` to take it apart); `embed(indices)`
returns the same layout. Stats as the VQ: 'perplexity', 'batch_usage', 'usage'.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from flax import nnx

from visual_tokenizers.core.errors import ConfigError
from visual_tokenizers.core.tokens.layout import Vocab
from visual_tokenizers.tokenizers.base import QuantizerOutput
from visual_tokenizers.tokenizers.vq import CodebookState, _entropy, _l2norm, nearest_code

sg = jax.lax.stop_gradient

# How the codebook / commitment MSEs are averaged (see the module docstring).
LOSS_AVERAGES = ("concatenated", "per_branch")


def _linear(din: int, dout: int, axes, rngs: nnx.Rngs) -> nnx.Linear:
    part = nnx.with_partitioning
    return nnx.Linear(
        din, dout, kernel_init=part(nnx.initializers.lecun_normal(), axes),
        bias_init=part(nnx.initializers.zeros_init(), axes[-1:]), rngs=rngs,
    )  # fmt: skip


class _Branch(nnx.Module):
    """One codebook with its projections: dim -> code_dim (search, l2-normalised) -> dim."""

    def __init__(self, dim: int, code_dim: int, codebook_size: int, *, rngs: nnx.Rngs):
        self.dim, self.code_dim = dim, code_dim
        if code_dim != dim:
            self.in_proj = _linear(dim, code_dim, ("embed", None), rngs)
            self.out_proj = _linear(code_dim, dim, (None, "embed"), rngs)
        else:
            self.in_proj = self.out_proj = None
        # As tokenizers/vq.py: uniform with variance 1 / K, then unit rows.
        init = nnx.initializers.variance_scaling(1.0, "fan_in", "uniform")
        codes = _l2norm(init(rngs.params(), (codebook_size, code_dim), jnp.float32))
        self.codebook = nnx.Param(codes, out_sharding=("codebook", None))

    def codes(self) -> jax.Array:
        return _l2norm(self.codebook[...].astype(jnp.float32))

    def project_in(self, z: jax.Array) -> jax.Array:
        z = jnp.asarray(z, jnp.float32)
        return _l2norm(self.in_proj(z) if self.in_proj is not None else z)

    def project_out(self, q: jax.Array) -> jax.Array:
        return self.out_proj(q) if self.out_proj is not None else q


class DualCodebookQuantizer(nnx.Module):
    """Semantic + pixel codebooks sharing one index; see the module docstring."""

    def __init__(
        self,
        semantic_dim: int,
        pixel_dim: int,
        codebook_size: int,
        *,
        semantic_code_dim: int = 32,
        pixel_code_dim: int = 8,
        pixel_weight: float = 1.0,
        beta: float = 0.25,
        codebook_weight: float = 1.0,
        usage_decay: float = 0.99,
        search_chunk_size: int = 8192,
        loss_average: str = "concatenated",
        dtype=jnp.float32,
        rngs: nnx.Rngs,
    ):
        if pixel_weight < 0:
            raise ConfigError(f"quantizer.pixel_weight={pixel_weight} must be >= 0")
        if loss_average not in LOSS_AVERAGES:
            raise ConfigError(
                f"quantizer.loss_average={loss_average!r}; choose one of {LOSS_AVERAGES} (one "
                "mean over the concatenated code, as TokenFlow, or one mean per codebook)"
            )
        self.loss_average = loss_average
        self.codebook_size, self.pixel_weight = codebook_size, pixel_weight
        self.beta, self.codebook_weight = beta, codebook_weight
        self.usage_decay, self.search_chunk_size = usage_decay, search_chunk_size
        self.dtype = dtype
        self.semantic = _Branch(semantic_dim, semantic_code_dim, codebook_size, rngs=rngs)
        self.pixel = _Branch(pixel_dim, pixel_code_dim, codebook_size, rngs=rngs)
        self.usage = CodebookState(jnp.zeros((codebook_size,)), out_sharding=("codebook",))

    @property
    def vocab(self) -> Vocab:
        return Vocab(size=self.codebook_size)

    def split(self, quantized: jax.Array) -> tuple[jax.Array, jax.Array]:
        """[..., semantic_dim + pixel_dim] -> ([..., semantic_dim], [..., pixel_dim])."""
        return quantized[..., : self.semantic.dim], quantized[..., self.semantic.dim :]

    def search(self, z_semantic: jax.Array, z_pixel: jax.Array) -> jax.Array:
        """i* for code-space (normalised) vectors [N, sem code dim] and [N, pix code dim]."""
        root_w = math.sqrt(self.pixel_weight)
        z = jnp.concatenate([z_semantic, root_w * z_pixel], -1)
        codes = jnp.concatenate([self.semantic.codes(), root_w * self.pixel.codes()], -1)
        idx, _ = nearest_code(sg(z), sg(codes), self.search_chunk_size)
        return idx

    def embed(self, indices: jax.Array) -> jax.Array:
        """Quantized pair [..., semantic_dim + pixel_dim] for code indices [...]."""
        sem = self.semantic.project_out(self.semantic.codes()[indices])
        pix = self.pixel.project_out(self.pixel.codes()[indices])
        return jnp.concatenate([sem, pix], -1).astype(self.dtype)

    def codebook_embeddings(self) -> dict[str, jax.Array]:
        """Both tables for export: code space [K, code_dim] and decoder inputs [K, dim]."""
        out = {}
        for name, branch in (("semantic", self.semantic), ("pixel", self.pixel)):
            codes = branch.codes()
            out[f"codebook_{name}_code_space"] = codes
            out[f"codebook_{name}"] = branch.project_out(codes).astype(self.dtype)
        return out

    def __call__(self, z_semantic, z_pixel, *, train: bool = False) -> QuantizerOutput:
        batch_shape = z_semantic.shape[:-1]
        if z_pixel.shape[:-1] != batch_shape:
            raise ConfigError(
                f"semantic latents {z_semantic.shape} and pixel latents {z_pixel.shape} must "
                "have the same token layout (same grid or number of 1-D latents)"
            )
        zs = self.semantic.project_in(z_semantic.reshape(-1, self.semantic.dim))
        zp = self.pixel.project_in(z_pixel.reshape(-1, self.pixel.dim))
        idx = self.search(zs, zp)
        outs, branches = [], (("semantic", self.semantic, zs), ("pixel", self.pixel, zp))
        qs = {name: branch.codes()[idx] for name, branch, _ in branches}
        for name, branch, z in branches:
            # Straight-through: forward value is the code, gradient the identity to z.
            out = branch.project_out(sg(qs[name]) + (z - sg(z)))
            outs.append(out.reshape(*batch_shape, branch.dim))
        losses, stats = self._code_losses(qs, {"semantic": zs, "pixel": zp})
        n, k = idx.shape[0], self.codebook_size
        counts = jnp.zeros((k,), jnp.float32).at[idx].add(1.0)
        stats["perplexity"] = jnp.exp(_entropy(counts / n))
        stats["batch_usage"] = jnp.mean(counts > 0)
        if train:
            d = self.usage_decay
            self.usage[...] = d * self.usage[...] + (1.0 - d) * counts / n
        # As tokenizers/vq.py: 'usage' = codes hit in roughly the last 1 / (1 - d) train steps.
        recent = (1.0 - self.usage_decay) * math.exp(-1.0) / n
        stats["usage"] = jnp.mean(self.usage[...] > recent)
        return QuantizerOutput(
            quantized=jnp.concatenate(outs, -1).astype(self.dtype),
            indices=idx.reshape(batch_shape),
            losses=losses,
            stats=stats,
        )

    def _code_losses(self, q: dict, z: dict) -> tuple[dict, dict]:
        """Codebook and commitment terms (weighted) and the per-branch code MSEs (stats) for
        codes q[name] and code-space inputs z[name], both [N, code_dim]."""
        # Sums of squares; codebook terms train the codes only, commitment terms the encoders.
        to_codes = {name: jnp.sum(jnp.square(q[name] - sg(z[name]))) for name in q}
        to_inputs = {name: jnp.sum(jnp.square(sg(q[name]) - z[name])) for name in q}
        sizes = {name: z[name].size for name in z}
        stats = {f"code_mse_{name}": sg(to_codes[name]) / sizes[name] for name in q}
        if self.loss_average == "per_branch":
            losses = {}
            for name in q:
                losses[f"codebook_{name}"] = self.codebook_weight * to_codes[name] / sizes[name]
                losses[f"commitment_{name}"] = self.beta * to_inputs[name] / sizes[name]
            return losses, stats
        # TokenFlow: torch.mean over the concatenated [N, d_sem + d_pix] code.
        total = sum(sizes.values())
        losses = {
            "codebook": self.codebook_weight * sum(to_codes.values()) / total,
            "commitment": self.beta * sum(to_inputs.values()) / total,
        }
        return losses, stats
