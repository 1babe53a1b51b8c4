"""Settings: ``ablation.py`` (AblationConfig, presets), ``cli.py`` (the parser), ``help_text.py``."""
