"""ESP-MedSAM as it ships with saved models (``trust_remote_code``): configuration, modeling (student and teacher),
losses, image reading, intensity and processing, processing, prediction, export, backends and the pipeline. Flat, with
single-dot imports, because transformers copies a saved model's code file and its single-dot siblings into one
folder. Nothing here imports the rest of ``esp_medsam_hf``."""
