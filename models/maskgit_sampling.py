"""MaskGIT sampling rules: mask schedules, guidance, temperatures, filters, option checks.

Pure functions over arrays, used by models/maskgit_decode.py (the decoding loop) and
models/maskgit.py (guidance). Each rule names its source:

- mask schedules (progress r in [0, 1] -> mask ratio): `cosine` (MaskGIT default), `linear`
  (the official `uniform`, accepted under both names), `square`, `arccos` (MUSE / MAGE), and the
  official `log`, `exp` and `pow<p>` (e.g. `pow2.5`) of maskgit/libml/mask_schedule.py, whose
  `log` and `exp` depend on the number of tokens to generate N0:
  log: -log2(r) / log2(N0); exp: 1 - 2^(-log2(N0) (1 - r)); pow<p>: 1 - r^p.
- classifier-free guidance, two parametrisations of one family (s = 1 + g):
  `guidance_form="ours"`:  uncond + s (cond - uncond)  (MUSE, lucidrains muse-maskgit-pytorch
  `forward_with_cond_scale`; s = 1 is conditional, s = 0 unconditional);
  `guidance_form="titok"`: cond + g (cond - uncond)    (TiTok, bytedance/1d-tokenizer
  modeling/maskgit.py `ImageBert.generate`; g = 0 is conditional).
  `guidance_schedule="linear"` is TiTok's `guidance_decay` ramp: g_t = g * t / T at step
  t = 0..T-1, i.e. conditional at the first step (the step that fixes the layout) rising towards
  the full g (reached at r = 1; (T-1)/T of it at the last step). In our form s_t = 1 + (s-1) t/T.
  Until this change `linear` was s * (t+1)/T in our form, below conditional early on (s = 3,
  T = 8: 0.375 at the first step). Open-MUSE's linspace(0, s, T) shares that flaw.
  `guidance_interval=(lo, hi)`: guidance only at steps with lo <= t/T < hi, conditional
  elsewhere (Kynkaanniemi et al. 2024, "Applying guidance in a limited interval").
- sampling temperature: `temperature` t0, annealed to `temperature_end` t1 as
  t0 + (t1 - t0) r with r = (t+1)/T (TiTok's `softmax_temperature_annealing`: 0.5 + 0.8 (1 - r),
  i.e. t0 = 1.3, t1 = 0.5); temperature 0 samples greedily (argmax).
- filters per group (each factorised head separately): top-k, then top-p (nucleus, Holtzman et
  al. 2020: the smallest set of tokens whose probability reaches p; the most likely always kept).
- confidence of a sampled token: `logprob` (the official decode: log p of the sampled token under
  the distribution it was sampled from) or `logit` (TiTok: the sampled token's logit).
- random draws: `rng="ours"` (one Gumbel draw per step from fold_in(key, step)) or `rng="official"`
  (as the official `parallel_decode.decode`: per step `rng, sample_rng = split(rng)`,
  `jax.random.categorical(sample_rng, logits)`, `rng, choice_rng = split(rng)`, Gumbel choice
  noise from choice_rng, and its cut-off masking rule), so that both give the same tokens for
  the same key and logits function.
"""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp

from visual_tokenizers.core.errors import ConfigError

_FIXED = {
    "cosine": lambda r: jnp.cos(0.5 * math.pi * r),  # MaskGIT's default
    "linear": lambda r: 1.0 - r,
    "uniform": lambda r: 1.0 - r,  # the official name of `linear`
    "square": lambda r: 1.0 - r * r,
    "arccos": lambda r: jnp.arccos(r) / (0.5 * math.pi),  # MUSE / MAGE
}
SCHEDULES = (*_FIXED, "log", "exp", "pow<p>")  # names for messages; pow takes a number
GUIDANCE_SCHEDULES = ("constant", "linear")
GUIDANCE_FORMS = ("ours", "titok")
CONFIDENCES = ("logprob", "logit")
RNG_MODES = ("ours", "official")


def check_schedule(name: str, what: str = "mask schedule") -> None:
    if name in _FIXED or name in ("log", "exp"):
        return
    if name.startswith("pow"):
        try:
            if float(name[3:]) > 0:
                return
        except ValueError:
            pass
    raise ConfigError(f"unknown {what} {name!r}; choose one of {SCHEDULES} (e.g. 'pow2.5')")


def mask_ratio(r, schedule: str = "cosine", total=None) -> jax.Array:
    """The fraction of tokens masked at progress r in [0, 1] under `schedule`.

    total: tokens to generate N0 (per sample, or a number), needed by `log` and `exp` only.
    """
    check_schedule(schedule)
    r = jnp.clip(jnp.asarray(r, jnp.float32), 0.0, 1.0)
    if schedule in _FIXED:
        ratio = _FIXED[schedule](r)
    elif schedule.startswith("pow"):
        ratio = 1.0 - r ** float(schedule[3:])
    else:
        if total is None:
            raise ConfigError(f"mask schedule {schedule!r} needs the token count")
        log_n = jnp.log2(jnp.asarray(total).astype(jnp.float32))
        # The official formulas, operation for operation (counts must match it exactly).
        ratio = -jnp.log2(r) / log_n if schedule == "log" else 1 - jnp.exp2(-log_n * (1 - r))
    # cos(pi/2) is -4e-8 in float32: clip so that counts never go negative.
    return jnp.clip(ratio, 0.0, 1.0)


def guidance_weight(step, steps: int, scale, schedule: str, interval) -> jax.Array:
    """TiTok's g_t at `step`: `scale` (constant) or scale * t / T (linear), 0 outside
    `interval` (fractions of the steps, lo <= t/T < hi)."""
    t = jnp.asarray(step, jnp.float32)
    g = jnp.asarray(scale, jnp.float32)
    if schedule == "linear":
        g = g * t / steps
    elif schedule != "constant":
        raise ConfigError(
            f"unknown guidance_schedule {schedule!r}; choose one of {GUIDANCE_SCHEDULES}"
        )
    lo, hi = interval
    inside = (t / steps >= lo) & (t / steps < hi)
    return jnp.where(inside, g, 0.0)


def apply_guidance(cond: jax.Array, uncond: jax.Array, weight, form: str = "ours") -> jax.Array:
    """cond + g (cond - uncond), written in `form`'s arithmetic.

    'ours' computes uncond + (1 + g) (cond - uncond), so g = -1 (scale 0) is exactly the
    unconditional logits; 'titok' computes cond + g (cond - uncond), exact at g = 0.
    """
    if form == "ours":
        return uncond + (1.0 + weight) * (cond - uncond)
    return cond + weight * (cond - uncond)


def temperature_at(step, steps: int, start: float, end: float | None) -> jax.Array:
    """t0 + (t1 - t0) r with r = (t+1)/T (TiTok's annealing); `start` when end is None."""
    if end is None:
        return jnp.float32(start)
    r = (jnp.asarray(step, jnp.float32) + 1.0) / steps
    return start + (end - start) * r


def filter_logits(logits: jax.Array, top_k: int = 0, top_p: float = 1.0) -> jax.Array:
    """Logits outside the top-k, then outside the nucleus of mass top_p, set to -inf."""
    if 0 < top_k < logits.shape[-1]:
        kth = jax.lax.top_k(logits, top_k)[0][..., -1:]
        logits = jnp.where(logits < kth, -jnp.inf, logits)
    if top_p < 1.0:
        ordered = jnp.sort(logits, axis=-1)[..., ::-1]
        probs = jax.nn.softmax(ordered, axis=-1)
        # Keep a token when the mass before it is under p: the first one always stays.
        before = jnp.cumsum(probs, axis=-1) - probs
        kept = jnp.sum(before < top_p, axis=-1, keepdims=True)
        cutoff = jnp.take_along_axis(ordered, kept - 1, axis=-1)
        logits = jnp.where(logits < cutoff, -jnp.inf, logits)
    return logits


@dataclasses.dataclass(frozen=True)
class SamplingOptions:
    """Every decoding option (see the module docstring); checked when built."""

    steps: int = 8
    temperature: float = 1.0
    temperature_end: float | None = None
    top_k: int = 0
    top_p: float = 1.0
    choice_temperature: float = 4.5
    schedule: str = "cosine"
    confidence: str = "logprob"
    rng: str = "ours"
    guidance_scale: float | None = None  # None: conditional only (one pass, as the official)
    guidance_form: str = "ours"
    guidance_schedule: str = "constant"
    guidance_interval: tuple[float, float] = (0.0, 1.0)

    def __post_init__(self):
        check_options(self)

    def guidance_weight(self) -> float | jax.Array | None:
        """TiTok's g for the configured scale (None: no guidance)."""
        if self.guidance_scale is None:
            return None
        return self.guidance_scale - 1.0 if self.guidance_form == "ours" else self.guidance_scale


def _need(ok: bool, message: str) -> None:
    if not ok:
        raise ConfigError(message)


def check_options(o: SamplingOptions) -> None:
    """ConfigError naming the option and the fix for any invalid sampling setting."""
    _need(isinstance(o.steps, int) and o.steps >= 1, f"steps={o.steps}: use an integer >= 1")
    for name in ("temperature", "temperature_end"):
        value = getattr(o, name)
        _need(
            value is None or value >= 0,
            f"{name}={value}: use a value >= 0 (0 samples greedily, the most likely token)",
        )
    _need(o.top_k >= 0, f"top_k={o.top_k}: use 0 (all tokens) or a positive count")
    _need(0 < o.top_p <= 1, f"top_p={o.top_p}: use a mass in (0, 1] (1 keeps every token)")
    _need(
        o.choice_temperature >= 0,
        f"choice_temperature={o.choice_temperature}: use a value >= 0 (0: no choice noise)",
    )
    check_schedule(o.schedule)
    for name, allowed in (
        ("confidence", CONFIDENCES),
        ("rng", RNG_MODES),
        ("guidance_form", GUIDANCE_FORMS),
        ("guidance_schedule", GUIDANCE_SCHEDULES),
    ):
        value = getattr(o, name)
        _need(value in allowed, f"{name}={value!r} is unknown; choose one of {allowed}")
    lo, hi = o.guidance_interval
    _need(
        0 <= lo < hi <= 1,
        f"guidance_interval={tuple(o.guidance_interval)}: use (lo, hi) with 0 <= lo < hi <= 1 "
        "(fractions of the steps; (0, 1) guides every step)",
    )
    if isinstance(o.guidance_scale, (int, float)):  # traced scales are checked by their caller
        least = 0.0 if o.guidance_form == "ours" else -1.0
        _need(
            o.guidance_scale >= least,
            f"guidance_scale={o.guidance_scale} with guidance_form={o.guidance_form!r}: use a "
            f"value >= {least} ({least} is unconditional sampling)",
        )
