"""Pretraining: the LightningModule, the active-forgetting callback, the LR schedules, and ``stage=pretrain``."""
