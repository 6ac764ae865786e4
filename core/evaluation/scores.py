"""The distribution metrics of one evaluation, from features of the evaluated images and a
`reference.Reference`: the one code path behind rFID (tokenizer mode, the trainer) and gFID.

Per Inception pipeline p in `pipelines` ('adm', 'pytorch_fid'): `{fid_name}_{p}` (FID),
`sfid_{p}` (sFID: FID of ADM's spatial features), `kid_{p}` and `kid_{p}_std` (KID, as
torch-fidelity computes it). On one pipeline only, `ips` (ADM's choice, so that the numbers
match ADM tables; the first listed when 'adm' is not evaluated): `inception_score` (unbiased
logits, ADM's 5,000-image splits), `precision` and `recall` (k-NN manifolds, k = pr_k). On
DINOv2 features: `fd_dinov2`. `pipeline_of` maps every number to the features it came from.
"""

from __future__ import annotations

from visual_tokenizers.core.data.decoding import DataError
from visual_tokenizers.core.evaluation import metrics

INCEPTION_METRICS = ("fid", "sfid", "kid", "is", "pr")
DINOV2 = "dinov2"


def single_pipeline(pipelines) -> str:
    """The pipeline whose features give IS and precision/recall: 'adm' (what ADM tables report)
    when it is evaluated, else the first one."""
    return "adm" if "adm" in pipelines else pipelines[0]


def spaces_used(wanted: set, pipelines) -> list[str]:
    """The feature spaces the evaluated images go through for the metrics in `wanted`."""
    main = [single_pipeline(pipelines)] if pipelines and wanted & {"is", "pr"} else []
    names = list(pipelines) if wanted & {"fid", "sfid", "kid"} else main
    return names + ([DINOV2] if "fd_dinov2" in wanted else [])


def needs(wanted: set, pipelines) -> dict:
    """{space: reference entries needed} for the metrics in `wanted` (see Reference); IS needs
    no reference."""
    result = {}
    main = single_pipeline(pipelines) if pipelines else None
    for p in pipelines:
        need = set()
        if "fid" in wanted:
            need.add("stats")
        if "sfid" in wanted:
            need.add("spatial")
        if "kid" in wanted or ("pr" in wanted and p == main):
            need.add("features")
        if need:
            result[p] = need
    if "fd_dinov2" in wanted:
        result[DINOV2] = {"stats"}
    return result


def minimum_counts(*, pr_k: int, kid_subset_size: int) -> dict:
    """{metric: (what it is called, least number of images)} for check_count."""
    return {
        "fid": ("FID", 2),  # a covariance needs two points
        "sfid": ("sFID", 2),
        "fd_dinov2": ("FD-DINOv2", 2),
        "kid": (
            f"KID with kid.subset_size={kid_subset_size} (or lower --config.kid.subset_size)",
            max(kid_subset_size, 2),
        ),
        "pr": (f"precision/recall with pr_k={pr_k}", pr_k + 1),
        "is": ("the Inception Score", 1),
    }


def _kid(reference: dict, samples, p: str, settings: dict) -> tuple[float, float]:
    ref, size = reference["features"], settings["kid_subset_size"]
    if len(ref) < size:
        raise DataError(
            f"KID ({p}) draws subsets of kid.subset_size={size} images from each side, but "
            f"the reference has {len(ref)} images; lower --config.kid.subset_size to at most "
            f"{len(ref)} or use a larger reference"
        )
    # Evaluated images first, reference second, torch-fidelity's seed: its subsets exactly.
    return metrics.kid(samples, ref, subsets=settings["kid_subsets"], subset_size=size)


def compare(reference, out: dict, wanted: set, pipelines, settings: dict) -> dict:
    """Metrics of `out` ({space: {kind: features}}) against `reference.found`.

    settings: fid_name ('rfid' or 'gfid'), pr_k, is_split_size, kid_subsets, kid_subset_size.
    Returns the numbers and `pipeline_of` (every number -> its feature space).
    """
    results, pipeline_of = {}, {}
    main = single_pipeline(pipelines) if pipelines else None

    def put(key, value, space):
        results[key], pipeline_of[key] = value, space

    for p in pipelines if wanted & {"fid", "sfid", "kid"} else ():
        ref, ours = reference.found[p], out[p]
        if "fid" in wanted:
            value = metrics.frechet_distance(
                *metrics.gaussian_stats(ours["pool"]), ref["mu"], ref["sigma"]
            )
            put(f"{settings['fid_name']}_{p}", value, p)
        if "sfid" in wanted:
            stats = metrics.gaussian_stats(ours["spatial"])
            put(f"sfid_{p}", metrics.frechet_distance(*stats, ref["mu_s"], ref["sigma_s"]), p)
        if "kid" in wanted:
            mean, std = _kid(ref, ours["pool"], p, settings)
            put(f"kid_{p}", float(mean), p)
            put(f"kid_{p}_std", float(std), p)
    if "is" in wanted:
        score = metrics.inception_score(out[main]["logits"], settings["is_split_size"])
        put("inception_score", score, main)
    if "pr" in wanted:
        features = reference.found[main]["features"]
        precision, recall = metrics.precision_recall(
            features, out[main]["pool"], k=settings["pr_k"]
        )
        put("precision", precision, main)
        put("recall", recall, main)
    if "fd_dinov2" in wanted:
        ref = reference.found[DINOV2]
        stats = metrics.gaussian_stats(out[DINOV2]["cls"])
        put("fd_dinov2", metrics.frechet_distance(*stats, ref["mu"], ref["sigma"]), DINOV2)
    return {**results, "pipeline_of": pipeline_of}
