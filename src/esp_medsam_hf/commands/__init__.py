"""Sub-commands of the ``esp-medsam`` command line (see ``esp_medsam_hf.cli``)."""
