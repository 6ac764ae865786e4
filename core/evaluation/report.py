"""The one report of an evaluation (WORKDIR/report.md, also logged): a table with both Inception
pipelines side by side, the other numbers, the sample count and the reference used, so nobody
has to guess what a number is. Reads the results dict of jobs/evaluate.py (scores.compare).
"""

from __future__ import annotations

QUOTE = (
    "Quote the `adm` column next to tables made with the ADM evaluator (guided-diffusion's "
    "evaluations/evaluator.py: ADM, DiT, MaskGIT, LlamaGen...) and the `pytorch_fid` column "
    "next to numbers made with pytorch-fid. Inception Score and precision/recall are computed "
    "on one pipeline's features only (`adm`, as the ADM evaluator does)."
)

# (row label, result key: '{fid}' is rfid or gfid, '{p}' the pipeline)
ROWS = (
    ("FID", "{fid}_{p}"),
    ("sFID", "sfid_{p}"),
    ("KID", "kid_{p}"),
    ("Inception Score", "inception_score"),
    ("precision", "precision"),
    ("recall", "recall"),
)
SHOWN_ELSEWHERE = {"pipeline_of", "pipelines", "reference"}


def fmt(value, digits: int = 4) -> str:
    if isinstance(value, float):
        return f"{value:.{digits}g}"
    return "n/a (not finite)" if value is None else str(value)


def _cell(results: dict, key: str, p: str) -> str:
    if key not in results:
        return "-"
    if results.get("pipeline_of", {}).get(key, p) != p:
        return "-"
    shown = fmt(results[key])
    if f"{key}_std" in results:
        shown += f" ± {fmt(results[f'{key}_std'], 2)}"
    return shown


def table(results: dict) -> list[str]:
    """The markdown rows of the pipelines table (empty when no Inception metric was asked)."""
    pipelines = results.get("pipelines") or []
    fid = "rfid" if any(k.startswith("rfid_") for k in results) else "gfid"
    rows = []
    for label, template in ROWS:
        keys = [template.format(fid=fid, p=p) for p in pipelines]
        if not any(k in results for k in keys):
            continue
        label = f"{fid[0]}{label}" if label == "FID" else label
        cells = [_cell(results, k, p) for k, p in zip(keys, pipelines, strict=True)]
        rows.append(f"| {label} | " + " | ".join(cells) + " |")
    if not rows:
        return []
    head = "| metric | " + " | ".join(f"`{p}`" for p in pipelines) + " |"
    return [head, "|---|" + "---|" * len(pipelines), *rows]


def lines(results: dict, title: str = "# Evaluation report") -> list[str]:
    """The whole report.md."""
    count = results.get("num_samples", results.get("num_examples"))
    evaluated = results.get("samples") or results.get("tokenizer", "")
    if "data" in results:
        evaluated += f" reconstructing {results['data']}"
    out = [title, "", f"Evaluated: {evaluated}; {count} images.", ""]
    ref = results.get("reference")
    if ref:
        how = "; ".join(f"`{p}`: {h}" for p, h in ref.get("statistics", {}).items())
        out += [f"Reference: {ref['name']} (statistics per pipeline: {how}).", ""]
    rows = table(results)
    if rows:
        out += [*rows, "", QUOTE, ""]
    if "fd_dinov2" in results:
        out += [f"FD-DINOv2 (DINOv2 ViT-L/14 CLS features): {fmt(results['fd_dinov2'])}", ""]
    shown = {k for k in results if k.startswith(("rfid_", "gfid_", "sfid_", "kid_"))}
    shown |= {"inception_score", "precision", "recall", "fd_dinov2"} | SHOWN_ELSEWHERE
    rest = {k: v for k, v in results.items() if k not in shown}
    if rest:
        out += ["| other | value |", "|---|---|"]
        out += [f"| {k} | {fmt(v)} |" for k, v in rest.items()]
        out.append("")
    return out


def sections(named: dict) -> list[str]:
    """One section per {name: results} with Inception metrics (e.g. the demo's samples and
    reconstructions): the pipelines table, the count, the reference, how far apart the two
    FIDs are; empty when none has them."""
    out = []
    for name, results in named.items():
        rows = table(results)
        if not rows:
            continue
        fid = "rfid" if any(k.startswith("rfid_") for k in results) else "gfid"
        a, b = results.get(f"{fid}_adm"), results.get(f"{fid}_pytorch_fid")
        gap = ""
        if isinstance(a, float) and isinstance(b, float):
            gap = (
                f" The two FIDs differ by {abs(a - b):.4g} "
                f"({abs(a - b) / max(abs(b), 1e-12):.1%} of the pytorch_fid value)."
            )
        count = results.get("num_samples", results.get("num_examples"))
        reference = results.get("reference", {}).get("name", "")
        out += [f"## Inception metrics: {name}", "", *rows, ""]
        out += [f"{count} images against {reference}.{gap} {QUOTE}", ""]
    return out
