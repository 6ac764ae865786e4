"""MaskGIT sampling rules (models/maskgit_sampling.py): guidance ramps in both
parametrisations and the guidance interval, greedy sampling, annealed temperature, top-p,
logit confidence, the official mask schedules, and the checks of every option."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from visual_tokenizers.core.errors import ConfigError
from visual_tokenizers.models import maskgit_decode as dec
from visual_tokenizers.models import maskgit_sampling as ms

RNG = np.random.default_rng(0)


def titok_weights(g, steps):
    """TiTok's ImageBert.generate with guidance_decay: cfg_scale 0 at the first step, then
    ratio * g after each step (bytedance/1d-tokenizer modeling/maskgit.py), rewritten here."""
    out, scale = [], 0.0
    for step in range(steps):
        out.append(scale)
        scale = (step + 1) / steps * g
    return out


def test_linear_guidance_starts_conditional_and_matches_titok():
    steps, s = 8, 3.0  # our scale s = 3 is TiTok's g = 2
    got = [float(ms.guidance_weight(t, steps, s - 1.0, "linear", (0.0, 1.0))) for t in range(8)]
    np.testing.assert_allclose(got, titok_weights(2.0, steps), rtol=1e-6)
    assert got[0] == 0.0  # conditional at the first step, not 0.375 x (cond - uncond) + uncond
    cond, uncond = RNG.normal(size=(2, 3, 5)).astype(np.float32)
    for g in (0.0, 0.7, 2.0):  # the two forms are one family: s = 1 + g
        ours = ms.apply_guidance(cond, uncond, g, "ours")
        np.testing.assert_allclose(ours, ms.apply_guidance(cond, uncond, g, "titok"), atol=1e-5)
        np.testing.assert_allclose(ours, uncond + (1 + g) * (cond - uncond), atol=1e-6)
    np.testing.assert_array_equal(ms.apply_guidance(cond, uncond, -1.0, "ours"), uncond)
    np.testing.assert_array_equal(ms.apply_guidance(cond, uncond, 0.0, "titok"), cond)
    # Interval (0.25, 0.75) of 8 steps: guidance at steps 2..5 only.
    inside = [float(ms.guidance_weight(t, 8, 2.0, "constant", (0.25, 0.75))) for t in range(8)]
    assert inside == [0, 0, 2, 2, 2, 2, 0, 0]


def test_guided_sampling_uses_the_ramp_and_interval():
    """MaskGIT.guided_logits_fn: conditional logits where the weight is 0."""
    from flax import nnx

    from visual_tokenizers.core.tokens.layout import Vocab
    from visual_tokenizers.models.maskgit import MaskGIT

    model = MaskGIT(vocab=Vocab(16), token_shape=(4,), num_classes=3, width=16, depth=1,
                    heads=2, mlp_dim=32, rngs=nnx.Rngs(0))  # fmt: skip
    labels = jnp.array([0, 2])
    ids, unknown = jnp.asarray(RNG.integers(0, 16, (2, 4, 1))), jnp.ones((2, 4), bool)
    cond = model(ids, unknown, labels)[0]
    uncond = model(ids, unknown, jnp.full_like(labels, 3))[0]
    ramp = model.guided_logits_fn(labels, 4, 3.0, "linear")
    np.testing.assert_allclose(ramp(ids, unknown, 0)[0], cond, atol=1e-5)
    np.testing.assert_allclose(
        ramp(ids, unknown, 2)[0], uncond + 2.0 * (cond - uncond), atol=1e-5
    )  # s_2 = 1 + 2 * 2/4
    titok = model.guided_logits_fn(
        labels, 4, 2.0, guidance_form="titok", guidance_interval=(0.5, 1)
    )
    np.testing.assert_allclose(titok(ids, unknown, 1)[0], cond, atol=1e-5)
    np.testing.assert_allclose(titok(ids, unknown, 3)[0], cond + 2 * (cond - uncond), atol=1e-5)


def _decode(logits, steps=3, **options):
    batch, length = logits.shape[:2]
    fn = lambda ids, unknown, step: (jnp.asarray(logits),)  # noqa: E731
    ids = np.zeros((batch, length, 1), np.int32)
    out, _ = dec.decode(fn, ids, np.ones((batch, length), bool), jax.random.key(1), steps=steps,
                        **options)  # fmt: skip
    return np.asarray(out[..., 0])


def test_temperature_zero_is_greedy():
    logits = RNG.normal(size=(3, 10, 7)).astype(np.float32) * 0.1  # flat: sampling would differ
    for rng in ("ours", "official"):
        out = _decode(logits, temperature=0.0, rng=rng)
        np.testing.assert_array_equal(out, logits.argmax(-1))
    # Annealed to 0 at the last step only: no NaN, every token a valid id.
    out = _decode(logits, temperature=1.0, temperature_end=0.0, choice_temperature=0.0)
    assert out.min() >= 0 and out.max() < 7
    assert np.any(_decode(logits, temperature=1.0) != logits.argmax(-1))


def test_annealed_temperature_is_titok_formula():
    steps = 10
    got = [float(ms.temperature_at(t, steps, 1.3, 0.5)) for t in range(steps)]
    titok = [0.5 + 0.8 * (1 - (t + 1) / steps) for t in range(steps)]  # softmax_temperature
    np.testing.assert_allclose(got, titok, rtol=1e-6)
    assert float(ms.temperature_at(3, steps, 2.0, None)) == 2.0


def test_top_p_keeps_the_nucleus():
    probs = np.array([0.05, 0.5, 0.15, 0.3], np.float32)
    logits = jnp.log(probs)[None]
    kept = lambda p: np.isfinite(np.asarray(ms.filter_logits(logits, top_p=p)))[0]  # noqa: E731
    np.testing.assert_array_equal(kept(0.4), [False, True, False, False])  # top-1 always
    np.testing.assert_array_equal(kept(0.75), [False, True, False, True])
    np.testing.assert_array_equal(kept(0.9), [False, True, True, True])
    np.testing.assert_array_equal(kept(1.0), [True] * 4)
    # Sampling with top_p 0.4 can only give the most likely token.
    big = np.broadcast_to(np.log(probs), (2, 30, 4))
    np.testing.assert_array_equal(_decode(big, top_p=0.4), 1)


def test_logit_confidence_scores_the_raw_logit():
    logits = (jnp.asarray(RNG.normal(size=(2, 5, 6)), jnp.float32) * 3,)
    noise = jax.random.gumbel(jax.random.key(0), (2, 5, 7))
    o = ms.SamplingOptions(confidence="logit")
    ids, score = dec.sample_groups(("ours", noise), logits, jnp.float32(1.0), o)
    picked = np.take_along_axis(np.asarray(logits[0]), np.asarray(ids), -1)[..., 0]
    np.testing.assert_allclose(score, picked, rtol=1e-6)
    _, logp = dec.sample_groups(("ours", noise), logits, jnp.float32(1.0), ms.SamplingOptions())
    np.testing.assert_allclose(logp, picked - jax.nn.logsumexp(logits[0], -1), atol=1e-5)


def test_official_mask_schedules():
    mask_schedule = pytest.importorskip("maskgit.libml.mask_schedule")
    r = jnp.array([0.05, 0.125, 0.5, 0.9, 1.0])
    for name in ("cosine", "uniform", "log", "exp", "pow2.5", "pow1"):
        for total in (16, 256):
            theirs = mask_schedule.schedule(r, total, name)
            ours = ms.mask_ratio(r, name, total)
            # The official clips to [1e-6, 1]; the counts floor(N ratio) are the same.
            np.testing.assert_allclose(ours, np.maximum(theirs, 0) * (theirs > 1e-6), atol=1e-6)
    np.testing.assert_allclose(ms.mask_ratio(0.5, "log", 256), 1 / 8, rtol=1e-6)
    assert math.isclose(float(ms.mask_ratio(0.5, "exp", 256)), 1 - 2**-4, rel_tol=1e-6)


@pytest.mark.parametrize(
    "options,named",
    [
        (dict(temperature=-0.5), "temperature"),
        (dict(temperature_end=-1.0), "temperature_end"),
        (dict(top_p=0.0), "top_p"),
        (dict(top_p=1.5), "top_p"),
        (dict(top_k=-1), "top_k"),
        (dict(steps=0), "steps"),
        (dict(choice_temperature=-1.0), "choice_temperature"),
        (dict(schedule="cosin"), "mask schedule"),
        (dict(schedule="powx"), "mask schedule"),
        (dict(confidence="prob"), "confidence"),
        (dict(rng="numpy"), "rng"),
        (dict(guidance_form="cfg"), "guidance_form"),
        (dict(guidance_schedule="cosine"), "guidance_schedule"),
        (dict(guidance_interval=(0.5, 0.5)), "guidance_interval"),
        (dict(guidance_interval=(-0.1, 1.0)), "guidance_interval"),
        (dict(guidance_interval=(0.0, 1.2)), "guidance_interval"),
        (dict(guidance_scale=-1.0), "guidance_scale"),
        (dict(guidance_scale=-2.0, guidance_form="titok"), "guidance_scale"),
    ],
)
def test_invalid_options_are_refused_by_name(options, named):
    with pytest.raises(ConfigError, match=named):
        ms.SamplingOptions(**options)
    ms.SamplingOptions(guidance_scale=-0.5, guidance_form="titok")  # a valid negative g


def test_sample_config_options_are_checked():
    from ml_collections import ConfigDict

    from visual_tokenizers.configs import sample as sample_config
    from visual_tokenizers.trained.maskgit import sample_options

    config = sample_config.get_config()
    assert sample_options(config)["guidance_scale"] is None  # the official: no guidance
    config.guidance_schedule = "linear"  # ramp of a zero guidance: still one plain pass
    assert sample_options(config)["guidance_scale"] is None
    config.update(guidance_form="titok", guidance_scale=1.0, temperature_end=0.5)
    options = sample_options(config)
    assert options["guidance_scale"] == 1.0 and options["temperature_end"] == 0.5
    with pytest.raises(ConfigError, match="sampling option temperature=-1.0"):
        sample_options(ConfigDict({**config.to_dict(), "temperature": -1.0}))
