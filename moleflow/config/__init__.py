from moleflow.config.ablation import AblationConfig, ConfigError, PRESETS, DEMO_SETTINGS, MVTEC_CLASSES
