"""Stand-in for transformers' tests/utils/test_configuration_utils.py (not in the sdist).

``config_common_kwargs``: a non-default value for each field of ``PreTrainedConfig`` that a caller may set, which
``ConfigTester.check_config_arguments_init`` passes to a config class and reads back.
"""

config_common_kwargs = {
    "return_dict": False,
    "output_hidden_states": True,
    "dtype": "float16",
    "chunk_size_feed_forward": 5,
    "architectures": ["EspMedSamModel"],
    "id2label": {0: "label"},
    "label2id": {"label": "0"},
    "problem_type": "regression",
}
