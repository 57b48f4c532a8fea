"""shardlib: shards as sparse-autoencoder directions in the space of RL parameter updates."""

__version__ = "0.1.0"
