"""The Hugging Face remote code of the ``sepllm_neox`` export (``convert_neox_to_hf.py --architecture sepllm_neox``).

``configuration_sepllm_neox.py`` and ``modeling_sepllm_neox.py`` are copied verbatim into every exported folder and
loaded there with ``trust_remote_code=True``, without this package: they import only torch, transformers and each
other (tests/test_export_remote_code.py checks it). Nothing here is imported by the framework itself, except the
configuration class by the exporter.
"""

REMOTE_CODE_FILES = ("configuration_sepllm_neox.py", "modeling_sepllm_neox.py")
