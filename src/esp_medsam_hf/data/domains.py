"""The 12 domains of ESP-MedSAM: modality, role (source or unseen), public dataset, citation and official splits.

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

from ..configuration_esp_medsam import MODALITY_NAMES, TARGET_NAMES
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
    paper: PaperFigures

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
        return TARGET_NAMES[self.modality_index]

    @property
    def is_source(self) -> bool:
        return self.role == "source"

    def splits(self) -> dict[str, list[str]]:
        """Official file names per ``datasets`` split name (train, validation, test), in the official order."""
        return {SPLIT_NAMES[key]: list(names) for key, names in _split_file(self.name).items()}

    def all_file_names(self) -> set[str]:
        return {name for names in _split_file(self.name).values() for name in names}


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

DOMAIN_NAMES: tuple[str, ...] = tuple(domain.name for domain in DOMAINS)
SOURCE_DOMAINS: tuple[str, ...] = tuple(domain.name for domain in DOMAINS if domain.is_source)
UNSEEN_DOMAINS: tuple[str, ...] = tuple(domain.name for domain in DOMAINS if not domain.is_source)
_BY_NAME = {domain.name: domain for domain in DOMAINS}


def get_domain(name: str) -> Domain:
    """The domain called ``name``; raises ``KeyError`` listing the valid names otherwise."""
    try:
        return _BY_NAME[name]
    except KeyError:
        raise KeyError(f"unknown domain {name!r}; expected one of {', '.join(DOMAIN_NAMES)}") from None


def resolve_domains(names: list[str] | tuple[str, ...] | None) -> list[Domain]:
    """Domains from a list of names; ``None``, ``all``, ``source`` and ``unseen`` are accepted as groups."""
    if not names:
        return list(DOMAINS)
    result: list[Domain] = []
    for name in names:
        group = {"all": DOMAIN_NAMES, "source": SOURCE_DOMAINS, "unseen": UNSEEN_DOMAINS}.get(name, (name,))
        for member in group:
            domain = get_domain(member)
            if domain not in result:
                result.append(domain)
    return result


def all_official_names() -> dict[str, str]:
    """Every official file name -> the domain whose lists name it (names are unique across domains)."""
    return {name: domain.name for domain in DOMAINS for name in domain.all_file_names()}
