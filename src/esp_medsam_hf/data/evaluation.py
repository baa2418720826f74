"""Score a model on the domains' test splits the way the paper does, and write the report (tables, plot, overlays).

:func:`evaluate_model` is the library entry point (the training loop calls it for validation Dice);
:func:`write_report` turns its result into ``results.md`` (the paper's Tables 3 and 5 beside ours),
``results.json``, ``dice_hd.png`` and ``cases/<domain>_{best,worst}.png``.
"""

from __future__ import annotations

import json
import logging
import math
import time
from collections.abc import Mapping
from pathlib import Path

import numpy as np

from ..models.esp_medsam.fileio import atomic_file, staging_directory
from ..drawing import overlay, save_png
from ..models.esp_medsam.prediction import predict
from ..metrics.functional import dice_score, hausdorff_distance, mean_dice, mean_hausdorff
from .domains import MODALITY_NAMES, get_domain
from .scale_table import scale_table_markdown
from .schema import image_to_rgb, mask_to_bool

logger = logging.getLogger(__name__)


def _as_split(dataset, split: str):
    """A ``Dataset`` from a Dataset or a DatasetDict (its ``split``)."""
    if hasattr(dataset, "keys") and not hasattr(dataset, "features"):
        if split not in dataset:
            raise KeyError(f"split {split!r} not in the dataset (it has {', '.join(dataset)})")
        return dataset[split]
    return dataset


def _domain_of(dataset) -> str:
    return dataset[0]["domain"] if len(dataset) else ""


def _score_image(
    image: np.ndarray,
    reference: np.ndarray,
    prediction: np.ndarray,
    modality: int,
    guess: str | None,
    references: Mapping | None,
    compute_hausdorff: bool,
    domain: str | None = None,
) -> dict:
    """One image's scores: Dice (and HD, HD95) of the prediction, each reference method's Dice, the errors of
    both (:func:`error_split`), and the modality (a dataset index) beside the classifier's pick (a name of the
    model's own modalities, which may have more than the six)."""
    entry = {"dice": dice_score(prediction, reference), "modality": MODALITY_NAMES[modality],
             "classifier_modality": guess}
    if references:
        entry["missed"], entry["extra"] = error_split(prediction, reference)
    for method, run in (references or {}).items():
        mask = run(image, reference, MODALITY_NAMES[modality], domain=domain)
        entry[f"dice_{method}"] = dice_score(mask, reference)
        entry[f"missed_{method}"], entry[f"extra_{method}"] = error_split(mask, reference)
    if compute_hausdorff:
        entry["hd"], entry["hd95"] = hausdorff_distance(prediction, reference)
    return entry


def error_split(prediction: np.ndarray, reference: np.ndarray) -> tuple[float, float]:
    """(missed, extra): the reference's pixels the prediction leaves out and the prediction's pixels outside the
    reference, both in % of the reference's pixels (NaN for an empty reference): where a Dice is lost."""
    prediction, reference = np.asarray(prediction, dtype=bool), np.asarray(reference, dtype=bool)
    area = int(reference.sum())
    if area == 0:
        return math.nan, math.nan
    return (100.0 * int((reference & ~prediction).sum()) / area, 100.0 * int((prediction & ~reference).sum()) / area)


def _keep_extremes(extremes: dict, case: dict) -> None:
    """Keep the best and the worst case by Dice seen so far in ``extremes`` (keys ``best`` and ``worst``)."""
    if "best" not in extremes or case["dice"] > extremes["best"]["dice"]:
        extremes["best"] = case
    if "worst" not in extremes or case["dice"] < extremes["worst"]["dice"]:
        extremes["worst"] = case


def evaluate_model(
    model, processor, datasets: Mapping, *, split: str = "test", batch_size: int | None = None,
    compute_hausdorff: bool = True, given_modality: bool = True, max_images: int | None = None, progress: bool = True,
    cases: dict | None = None, references: Mapping | None = None, scale=None, target: int | str | None = None,
    distributed: bool = False, backend: str | None = "eager", predictions: dict | None = None,
) -> dict:
    """Run ``model`` over ``datasets[name][split]`` (a Dataset or DatasetDict in the package schema, per report
    name) and score Dice (%) and Hausdorff distance (px) at the stored mask size.

    Images go through ``prediction.predict`` ``batch_size`` at a time (default ``backends.inference_batch_size``),
    each with its own modality (``given_modality``, as the official evaluation) or the predicted one, or with
    ``target`` (one of ``config.all_target_names``; or ``{name: target}`` per domain), at ``scale`` (``None``: the model's saved default; "whole", a
    zoom factor of the native pixels, or "<n>px"). Returns a JSON-ready dict: per domain ``dice``, ``hd``,
    ``hd95`` (HD means over images where both masks are non-empty, :mod:`esp_medsam_hf.metrics.functional`), the
    per-image values with the scale used and the classifier's pick (``classifier_accuracy`` per domain), and means
    over source and unseen domains. ``cases`` (a dict) receives each name's best and worst image; ``references``
    maps a method's name to ``predict(image, mask, modality name) -> mask`` (:mod:`.baselines`), scored on the
    same images; ``predictions`` (a dict) each image's ``Prediction.item`` by ``(name, file_name)`` (for
    ``data.interactive`` to reuse; this process's images when ``distributed``). ``backend`` goes to ``backends.run_inference`` (``"eager"``, the default: the PyTorch model, as
    training's validation needs while the weights move; ``None``/``"auto"``: the path users take, onnxruntime on a
    CPU, in int8 where that holds). The model's train/eval mode is restored afterwards. ``distributed``: every process of an
    ``accelerate launch`` (all must call it) scores its share of each domain and all get the whole report.
    """
    from ..models.esp_medsam.backends import inference_batch_size

    was_training = model.training
    model.eval()
    batch_size = batch_size or inference_batch_size(next(model.parameters()).device)
    report: dict = {"split": split, "domains": {}, "given_modality": given_modality}
    total_images, model_seconds, start = 0, 0.0, time.perf_counter()
    try:
        for name, data in datasets.items():
            dataset = _as_split(data, split)
            if max_images is not None:
                dataset = dataset.select(range(min(max_images, len(dataset))))
            domain_target = target.get(name) if isinstance(target, Mapping) else target
            options = dict(batch_size=batch_size, given_modality=given_modality, scale=scale, target=domain_target,
                           backend=backend, references=references, compute_hausdorff=compute_hausdorff,
                           keep_cases=cases is not None, predictions=predictions)
            per_image, sizes, extremes, seconds = _evaluate_domain(model, processor, name, dataset, options,
                                                                   progress=progress, distributed=distributed)
            model_seconds, total_images = model_seconds + seconds, total_images + len(per_image)
            summary = _domain_summary(_domain_of(dataset), per_image, compute_hausdorff, list(references or ()))
            notes = {method: run.describe(name, summary.get("modality", ""))
                     for method, run in (references or {}).items() if hasattr(run, "describe")}
            if notes:
                summary["reference_notes"] = notes
            if domain_target is not None:
                summary["target"] = model.config.all_target_names[model.config.target_index(domain_target)]
            report["domains"][name] = {**summary, "mask_sizes": sorted(sizes)}
            if cases is not None and extremes:
                cases[name] = extremes
            logger.info("%s: Dice %.2f%% over %d image(s)", name, summary["dice"], len(per_image))
    finally:
        model.train(was_training)
    seconds = time.perf_counter() - start
    report.update(num_images=total_images, seconds=seconds, summary=_role_summary(report["domains"]),
                  images_per_second=total_images / seconds if seconds > 0 else math.nan,
                  model_images_per_second=total_images / model_seconds if model_seconds > 0 else math.nan)
    return report


def _evaluate_domain(model, processor, name: str, dataset, options: dict, *, progress: bool, distributed: bool):
    """``_evaluate_dataset`` on one domain behind a progress bar; ``distributed``: each process on its share, and
    every process gets all the results."""
    from accelerate import PartialState
    from tqdm.auto import tqdm

    if distributed:
        dataset = _shard(dataset)
    bar = tqdm(total=len(dataset), desc=f"evaluate {name}", unit="img",
               disable=not progress or (distributed and not PartialState().is_main_process))
    results = _evaluate_dataset(model, processor, dataset, bar, name=name, **options)
    bar.close()
    return _gather_domain(*results) if distributed else results


def _shard(dataset):
    """This process's contiguous share of ``dataset`` (accelerate's ``split_between_processes``)."""
    from accelerate import PartialState

    with PartialState().split_between_processes(list(range(len(dataset)))) as indices:
        return dataset.select(list(indices))


def _gather_domain(per_image: list[dict], sizes: set[str], extremes: dict, seconds: float):
    """Every process's scores of one domain, in the dataset's order (the shares are contiguous), on every process:
    the entries, mask sizes, best and worst cases, and the longest time in the model."""
    from accelerate.utils import gather_object

    parts = gather_object([(per_image, sorted(sizes), extremes, seconds)])
    merged: dict = {}
    for _, _, cases, _ in parts:
        for case in cases.values():
            _keep_extremes(merged, case)
    return ([entry for part in parts for entry in part[0]], {size for part in parts for size in part[1]}, merged,
            max(part[3] for part in parts))


def _evaluate_dataset(
    model, processor, dataset, bar, *, batch_size: int, given_modality: bool, scale, target, references,
    compute_hausdorff: bool, keep_cases: bool, name: str | None = None, backend: str | None = "eager",
    predictions: dict | None = None,
) -> tuple[list[dict], set[str], dict, float]:
    """One domain's images through ``prediction.predict`` and scored: (per-image entries, mask sizes, best and
    worst cases when ``keep_cases``, seconds spent in the model). ``bar`` advances by each batch; ``predictions``
    as ``evaluate_model`` says."""
    per_image: list[dict] = []
    sizes: set[str] = set()
    extremes: dict = {}
    model_seconds = 0.0
    for batch in dataset.iter(batch_size=batch_size):
        images = [image_to_rgb(image) for image in batch["image"]]
        masks = [mask_to_bool(mask) for mask in batch["mask"]]
        tick = time.perf_counter()
        batch_prediction = predict(model, processor, images, batch["modality"] if given_modality else None,
                                   scale=scale, target=target, backend=backend)
        model_seconds += time.perf_counter() - tick
        for index, (image, reference, prediction, file_name, modality, guess, used) in enumerate(zip(
            images, masks, batch_prediction.masks, batch["file_name"], batch["modality"],
            batch_prediction.classifier_modality, batch_prediction.scales
        )):
            if predictions is not None:
                predictions[name, file_name] = batch_prediction.item(index)
            guess = None if guess is None else model.config.modality_names[guess]
            entry = _score_image(image, reference, prediction, modality, guess, references, compute_hausdorff,
                                 domain=name)
            entry = {"file_name": file_name, **entry, "scale": used}
            sizes.add(f"{reference.shape[0]}x{reference.shape[1]}")
            per_image.append(entry)
            if keep_cases:
                _keep_extremes(extremes, {"image": image, "mask": reference, "prediction": prediction,
                                          "dice": entry["dice"], "file_name": file_name})
        bar.update(len(images))
    return per_image, sizes, extremes, model_seconds


def _domain_summary(domain: str, per_image: list[dict], compute_hausdorff: bool, references: list[str]) -> dict:
    summary: dict = {"domain": domain, "num_images": len(per_image), "dice": mean_dice([e["dice"] for e in per_image])}
    try:
        spec = get_domain(domain)
    except KeyError:
        spec = None
    if spec is not None:
        summary.update(modality=spec.modality, role=spec.role)
        if spec.paper is not None:
            summary["paper"] = {"dice": spec.paper.dice, "hd": spec.paper.hd}
    elif per_image:
        summary.update(modality=per_image[0]["modality"], role="custom")
    if references:
        summary["references"] = {name: mean_dice([e[f"dice_{name}"] for e in per_image]) for name in references}
    guessed = [e for e in per_image if e.get("classifier_modality") is not None]
    if guessed:
        summary["classifier_accuracy"] = 100.0 * float(np.mean([e["classifier_modality"] == e["modality"]
                                                                 for e in guessed]))
    if compute_hausdorff:
        summary["hd"], summary["hd_undefined"] = mean_hausdorff([e["hd"] for e in per_image])
        summary["hd95"], _ = mean_hausdorff([e["hd95"] for e in per_image])
    summary["per_image"] = per_image
    return summary


def _role_summary(domains: dict) -> dict:
    result = {}
    for role in ("source", "unseen"):
        rows = [row for row in domains.values() if row.get("role") == role and row["num_images"]]
        if rows:
            entry = {"domains": len(rows), "dice": float(np.mean([row["dice"] for row in rows]))}
            entry["paper_dice"] = float(np.mean([row["paper"]["dice"] for row in rows]))
            hds = [row["hd"] for row in rows if "hd" in row and math.isfinite(row["hd"])]
            if hds:
                entry["hd"] = float(np.mean(hds))
            entry["paper_hd"] = float(np.mean([row["paper"]["hd"] for row in rows]))
            result[role] = entry
    return result


def _number(value: float | None, digits: int = 2) -> str:
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return "n/a"
    return f"{value:.{digits}f}"


def markdown_table(report: dict, data_label: str = "") -> str:
    """The per-domain results as Markdown: source domains (paper's Table 3) and unseen domains (Table 5)."""
    lines = []
    if data_label:
        lines += [f"Data: {data_label}. Split: {report['split']}.", ""]
    groups = (
        ("Source domains (paper: Table 3)", "source"),
        ("Unseen domains, zero-shot (paper: Table 5)", "unseen"),
        ("Other", None),
    )
    lines += reference_table(report)
    for title, role in groups:
        rows = [(name, row) for name, row in report["domains"].items() if row.get("role") == role]
        if not rows:
            continue
        lines += [
            f"### {title}",
            "",
            "| domain | modality | images | Dice % (ours) | Dice % (paper) | HD px (ours) | HD px (paper) | HD95 px |",
            "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: |",
        ]
        for name, row in rows:
            paper = row.get("paper", {})
            hd = _number(row.get("hd"))
            if row.get("hd_undefined"):
                hd += f" ({row['hd_undefined']} undefined)"
            lines.append(
                f"| {name} | {row.get('modality', '')} | {row['num_images']} | {_number(row['dice'])} | "
                f"{_number(paper.get('dice'))} | {hd} | {_number(paper.get('hd'))} | {_number(row.get('hd95'))} |"
            )
        if role in report.get("summary", {}):
            mean = report["summary"][role]
            lines.append(
                f"| **mean** | | | **{_number(mean['dice'])}** | {_number(mean['paper_dice'])} | "
                f"**{_number(mean.get('hd'))}** | {_number(mean['paper_hd'])} | |"
            )
        lines.append("")
    sizes = sorted({size for row in report["domains"].values() for size in row.get("mask_sizes", [])})
    lines.append(
        f"Hausdorff distances are in pixels of the stored masks ({', '.join(sizes) or 'none'}); the paper's are on "
        "1024x1024 masks, so HD is comparable only for data prepared at 1024 px. HD means leave out images where "
        "a mask is empty (counted as undefined)."
    )
    lines.append("")
    lines.append(
        f"{report['num_images']} images in {report['seconds']:.1f} s: {report['images_per_second']:.2f} images/s "
        f"end to end, {report['model_images_per_second']:.2f} images/s in the model (pre/post-processing included)."
    )
    return "\n".join(lines) + "\n"


REFERENCE_TITLES = {"otsu": "Otsu", "litemedsam-boxes": "LiteMedSAM + GT boxes"}


def reference_table(report: dict) -> list[str]:
    """Markdown lines: the real and user domains with ours beside the reference methods, per domain and per image
    (prompt-free ours and Otsu; LiteMedSAM is given one ground-truth box per object)."""
    rows = [(name, row) for name, row in report["domains"].items() if row.get("role") in ("real", "custom")]
    if not rows:
        return []
    methods = list(dict.fromkeys(m for _, row in rows for m in row.get("references", {})))
    titles = [REFERENCE_TITLES.get(m, m) for m in methods]
    lines = ["### Real images and your own data: ours (prompt-free) beside the references, Dice %", "",
             "| domain | modality | images | ours | " + " | ".join(titles) + " | classifier accuracy % |",
             "| --- | --- | ---: | ---: | " + " | ".join("---:" for _ in methods) + " | ---: |"]
    for name, row in rows:
        references = row.get("references", {})
        lines.append(f"| {name} | {row.get('modality', '')} | {row['num_images']} | **{_number(row['dice'])}** | "
                     + " | ".join(_number(references.get(m)) for m in methods)
                     + f" | {_number(row.get('classifier_accuracy'), 1)} |")
    lines += ["", "<details><summary>per image</summary>", "",
              "| domain | image | ours | " + " | ".join(titles) + " | classifier says |",
              "| --- | --- | ---: | " + " | ".join("---:" for _ in methods) + " | --- |"]
    for name, row in rows:
        for entry in row["per_image"]:
            lines.append(f"| {name} | {entry['file_name']} | {_number(entry['dice'])} | "
                         + " | ".join(_number(entry.get(f"dice_{m}")) for m in methods)
                         + f" | {entry.get('classifier_modality') or 'n/a'} |")
    lines += ["", "</details>", ""]
    return lines + reference_notes(rows) + below_baseline(rows)


def reference_notes(rows: list[tuple[str, dict]]) -> list[str]:
    """Markdown lines: how each reference ran per domain (Otsu's polarity and where it came from), and a warning for
    a reference that scores 0 on a domain (it found nothing of the target: a wrong polarity or channel, not a
    baseline to beat)."""
    lines = []
    for name, row in rows:
        for method, note in row.get("reference_notes", {}).items():
            lines.append(f"- {REFERENCE_TITLES.get(method, method)} on {name}: {note}.")
        for method, value in row.get("references", {}).items():
            if row["num_images"] and value is not None and value == 0:
                lines.append(f"- **Warning: {REFERENCE_TITLES.get(method, method)} scores 0 on {name}**: it finds "
                             "none of the target there (a wrong polarity or channel?); it is no baseline on it.")
    return lines + [""] if lines else []


def below_baseline(rows: list[tuple[str, dict]], method: str = "otsu") -> list[str]:
    """Markdown lines naming every image where ours scores below ``method`` and what the loss is made of: the
    mask's pixels ours misses and the pixels it adds, beside the same two errors of ``method``."""
    title = REFERENCE_TITLES.get(method, method)
    lines = []
    for name, row in rows:
        for entry in row["per_image"]:
            theirs = entry.get(f"dice_{method}")
            if theirs is None or entry.get("missed") is None or not entry["dice"] < theirs:
                continue
            missed, extra = entry["missed"] - entry[f"missed_{method}"], entry["extra"] - entry[f"extra_{method}"]
            why = (f"ours leaves out mask pixels that {title} finds" if missed >= extra
                   else f"ours marks pixels outside the mask that {title} leaves out")
            lines.append(f"| {name} | {entry['file_name']} | {_number(entry['dice'])} | {_number(theirs)} | "
                         f"{_number(entry['missed'], 1)} / {_number(entry[f'missed_{method}'], 1)} | "
                         f"{_number(entry['extra'], 1)} / {_number(entry[f'extra_{method}'], 1)} | {why} |")
    total = sum(len(row["per_image"]) for _, row in rows)
    if not any(f"dice_{method}" in entry for _, row in rows for entry in row["per_image"]):
        return []
    if not lines:
        return [f"Ours is at or above {title} on all {total} images.", ""]
    return [f"### Images where ours is below {title} ({len(lines)} of {total}), and why", "",
            "Missed: the mask's pixels left out; extra: pixels marked outside the mask; both in % of the mask's "
            f"pixels, ours / {title}.", "",
            f"| domain | image | ours | {title} | missed % | extra % | the difference |",
            "| --- | --- | ---: | ---: | ---: | ---: | --- |", *lines, ""]


def bar_chart(report: dict, path: Path, title: str = "") -> Path:
    """Grouped bars of Dice and HD per domain, ours beside the paper's."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(report["domains"])
    rows = [report["domains"][name] for name in names]
    x = np.arange(len(names))
    figure, axes = plt.subplots(1, 2, figsize=(max(8, 1.1 * len(names) + 4), 4), constrained_layout=True)
    for axis, key, label in ((axes[0], "dice", "Dice (%)"), (axes[1], "hd", "Hausdorff distance (px)")):
        ours = [row.get(key, math.nan) for row in rows]
        paper = [row.get("paper", {}).get(key, math.nan) for row in rows]
        axis.bar(x - 0.2, [v if math.isfinite(v) else 0 for v in ours], 0.4, label="ours", color="tab:blue")
        axis.bar(x + 0.2, [v if math.isfinite(v) else 0 for v in paper], 0.4, label="paper", color="tab:gray")
        axis.set_xticks(x, [f"{n}\n({r.get('role', '')})" for n, r in zip(names, rows)], fontsize=8)
        axis.set_ylabel(label)
        axis.legend(fontsize=8)
    if title:
        figure.suptitle(title, fontsize=10)
    with atomic_file(path) as temporary:
        figure.savefig(temporary, dpi=100)
    plt.close(figure)
    return path


def case_picture(case: dict) -> np.ndarray:
    """Image | ground truth (green) | prediction (magenta outline over the ground truth), side by side."""
    factor = max(1, 256 // max(case["image"].shape[:2]))  # small images are enlarged to be seen
    image, mask, prediction = (
        case[key].repeat(factor, axis=0).repeat(factor, axis=1) for key in ("image", "mask", "prediction")
    )
    gap = np.full((image.shape[0], 4, 3), 255, dtype=np.uint8)
    return np.concatenate(
        [image, gap, overlay(image, mask), gap, overlay(image, mask, prediction)], axis=1
    )


def _json_safe(value):
    """Strict JSON: undefined distances (MONAI's inf and nan) become null."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {key: _json_safe(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_safe(item) for item in value]
    return value


def write_report(
    report: dict, output_dir: str | Path, *, cases: dict | None = None, data_label: str = "", overwrite: bool = False
) -> Path:
    """Write ``results.md``, ``results.json`` (strict JSON: undefined values are null), ``dice_hd.png`` and
    ``cases/`` into ``output_dir`` atomically. ``report["scale_tables"]`` (from ``scale_table.scale_tables``), when
    present, adds the scale tables to ``results.md`` (and is saved in ``results.json``)."""
    output_dir = Path(output_dir)
    if output_dir.exists() and any(output_dir.iterdir()) and not overwrite:
        raise FileExistsError(f"{output_dir} already exists and is not empty; pass overwrite=True (--overwrite)")
    with staging_directory(output_dir) as staging:
        text = f"# Evaluation\n\n{markdown_table(report, data_label)}"
        if report.get("scale_tables"):
            text += f"\n## Dice at other magnifications\n\n{scale_table_markdown(report['scale_tables'])}"
        (staging / "results.md").write_text(text)
        saved = _json_safe({**report, "data": data_label})
        (staging / "results.json").write_text(json.dumps(saved, indent=2, allow_nan=False) + "\n")
        bar_chart(report, staging / "dice_hd.png", title=data_label)
        for name, pair in (cases or {}).items():
            for which in ("best", "worst"):
                save_png(case_picture(pair[which]), staging / "cases" / f"{name}_{which}.png")
    return output_dir

