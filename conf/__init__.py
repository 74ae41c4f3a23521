"""afpt's Hydra configs, installed as the package ``afpt.conf`` (the YAML files are its package data)."""
