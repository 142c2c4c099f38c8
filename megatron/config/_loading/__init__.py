"""How a config is read (private to ``megatron.config``): YAML, key spellings, merging, type coercion, the
unsupported-feature table, GPT-NeoX compatibility and validation into a ``NeoXConfig``.

Other packages use the public side only: ``megatron.config.load_config`` and the typed sections, derived values,
layout and errors it returns. Nothing outside ``megatron/config`` imports this sub-package (tests and tools/dev may).
"""
