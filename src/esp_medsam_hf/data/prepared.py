"""A folder written by ``esp-medsam prepare``: which domains it holds, its dataset card, and loading it.

Layout: ``OUTPUT/<domain>/arrow`` (``save_to_disk``), ``OUTPUT/<domain>/data/<split>-NNNNN-of-NNNNN.parquet``,
``OUTPUT/<domain>/domain.json`` and ``OUTPUT/README.md``, a dataset card whose ``configs`` make
``load_dataset(OUTPUT, "<domain>")`` work. :func:`load_domains` is the one loader of prepared (or synthetic) domains
that evaluation and training share.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from pathlib import Path

from ..models.esp_medsam.fileio import atomic_file
from .domains import DOMAINS, GROUPS, REAL_DOMAINS, SOURCE_DOMAINS, Domain, get_domain, resolve_domains

CARD_TITLE = "# ESP-MedSAM domains"
CARD_TEMPLATE = Path(__file__).with_name("templates") / "dataset_card.md"


class PreparedDataError(ValueError):
    """A prepared folder, or a domain or split in it, is missing (the message names it and how to prepare it)."""


def prepared_domains(output_dir: str | Path) -> list[str]:
    """Domains that have Parquet shards under ``output_dir``: registered ones in registry order, then a user's own
    in alphabetical order."""
    output_dir = Path(output_dir)
    if not output_dir.is_dir():
        return []
    found = {p.name for p in output_dir.iterdir() if not p.name.startswith(".") and any((p / "data").glob("*.parquet"))}
    registered = [d.name for d in DOMAINS + REAL_DOMAINS if d.name in found]
    return registered + sorted(found - set(registered))


def prepared_domain_spec(output_dir: str | Path, name: str) -> Domain:
    """What ``output_dir/<name>`` holds: its ``domain.json``, or the registered domain of that name."""
    record = Path(output_dir) / name / "domain.json"
    if record.is_file():
        return Domain.from_dict(json.loads(record.read_text()))
    return get_domain(name)


def check_card_replaceable(output_dir: Path, overwrite: bool) -> None:
    """A ``README.md`` that is not this package's dataset card is the user's: never replaced, ``--overwrite`` or
    not (a command replaces only what it wrote itself)."""
    readme = Path(output_dir) / "README.md"
    if not readme.is_file():
        return
    if CARD_TITLE not in readme.read_text(errors="replace"):
        why = " (--overwrite replaces only what prepare wrote)" if overwrite else ""
        raise FileExistsError(f"{readme} is not a dataset card written by esp-medsam prepare{why}; move it away or "
                              "choose another output folder")


def write_card(output_dir: str | Path, synthetic: bool | None = None) -> Path:
    """(Re)write ``output_dir/README.md``: a dataset card (``DatasetCard.from_template``) with one config per
    prepared domain; ``synthetic`` defaults to the folder's ``.synthetic`` mark."""
    from huggingface_hub import DatasetCard, DatasetCardData

    output_dir = Path(output_dir)
    names = prepared_domains(output_dir)
    if synthetic is None:
        synthetic = (output_dir / ".synthetic").exists()
    configs = []
    for name in names:
        splits = sorted({p.name.split("-")[0] for p in (output_dir / name / "data").glob("*.parquet")})
        data_files = [{"split": split, "path": f"{name}/data/{split}-*.parquet"} for split in splits]
        configs.append({"config_name": name, "data_files": data_files})
    rows = []
    for name in names:
        domain = prepared_domain_spec(output_dir, name)
        rows.append({"name": name, "modality": domain.modality, "role": domain.role,
                     "dataset": "synthetic" if synthetic else domain.dataset,
                     "citation": "" if synthetic else domain.citation})
    card_data = DatasetCardData(license="other", task_categories=["image-segmentation"],
                                tags=["medical", "esp-medsam"] + (["synthetic"] if synthetic else []), configs=configs)
    card = DatasetCard.from_template(card_data, template_path=str(CARD_TEMPLATE), synthetic=synthetic, rows=rows,
                                     title=CARD_TITLE + (" (SYNTHETIC)" if synthetic else ""))
    path = output_dir / "README.md"
    with atomic_file(path) as temporary:
        temporary.write_text(str(card))
    return path


def load_domains(
    data: str | Path,
    domains: Sequence[str] | None,
    *,
    splits: Mapping[str, int],
    seed: int = 0,
    size: int = 128,
) -> dict:
    """``{domain: DatasetDict}`` of ``domains`` with the given splits.

    ``data`` is ``"synthetic"`` (``splits`` maps split name to images per domain; default domains: the source
    domains) or a folder written by ``esp-medsam prepare`` (default domains: the source domains it holds, else all
    it holds; a user's own domain is named as it was prepared). A missing folder, domain or split raises
    ``PreparedDataError`` naming it.
    """
    if data == "synthetic":
        from .synthetic import synthetic_domains

        names = [d.name for d in resolve_domains(domains)] if domains else list(SOURCE_DOMAINS)
        return synthetic_domains(names, dict(splits), seed=seed, size=size)
    root = Path(data)
    return {name: _load_domain(root / name, splits) for name in prepared_names(root, domains)}


def prepared_names(root: str | Path, domains: Sequence[str] | None) -> list[str]:
    """The domains of prepared folder ``root`` that ``load_domains`` loads for ``domains`` (names and groups; none:
    the source domains it holds, else all it holds); a missing folder or domain raises ``PreparedDataError``."""
    root = Path(root)
    if not root.is_dir():
        what = "is a file, not a folder" if root.exists() else "does not exist"
        raise PreparedDataError(
            f"dataset folder {root} {what}; prepare it with `esp-medsam prepare` or use data: synthetic"
        )
    available = prepared_domains(root)
    if domains:
        names = list(dict.fromkeys(member for name in domains for member in GROUPS.get(name, (name,))))
    else:
        names = [name for name in available if name in SOURCE_DOMAINS] or available
    for name in names:
        if name not in available:
            raise PreparedDataError(
                f"{root} has no prepared data for domain {name!r} (it has: {', '.join(available) or 'nothing'}); "
                f"run `esp-medsam prepare --domains {name} --output {root}`"
            )
    return names


def _load_domain(folder: Path, splits: Mapping[str, int]):
    """The ``splits`` of one prepared domain: from its Arrow copy, else from its Parquet shards."""
    import datasets

    if (folder / "arrow").is_dir():
        dataset = datasets.load_from_disk(str(folder / "arrow"))
    else:
        dataset = datasets.load_dataset(
            "parquet", data_files={split: str(folder / "data" / f"{split}-*.parquet") for split in splits}
        )
    dataset = datasets.DatasetDict({split: dataset[split] for split in splits if split in dataset})
    for split in splits:
        if split not in dataset:
            raise PreparedDataError(f"{folder}: split {split!r} is missing (it has {', '.join(dataset)})")
    return dataset
