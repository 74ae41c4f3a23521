"""``afpt-lightning``: Lightning's own CLI over afpt's module, data module and forgetting callback.

    afpt-lightning fit --model.model='{family: llama, hidden_size: 64, num_layers: 2, num_heads: 2}' \\
        --data.data='{source: world, world: {seed: 0}}' --trainer.max_steps=300 \\
        --trainer.callbacks+=afpt.pretrain.forgetting.ActiveForgetting --trainer.callbacks.every_n_steps=100
    afpt-lightning fit --config my.yaml        (afpt-lightning fit --print_config > my.yaml writes one)
"""

from __future__ import annotations

from lightning.pytorch.cli import LightningCLI

from afpt.data import CorpusDataModule
from afpt.pretrain.module import CausalLMModule


def cli(args: list[str] | None = None) -> LightningCLI:
    """Run ``LightningCLI`` with ``CausalLMModule`` and ``CorpusDataModule`` (subcommands fit/validate/...)."""
    return LightningCLI(
        CausalLMModule,
        CorpusDataModule,
        args=args,
        seed_everything_default=0,
        save_config_kwargs={"overwrite": True},
    )


def main() -> None:
    """The ``afpt-lightning`` console script."""
    cli()


if __name__ == "__main__":
    main()
