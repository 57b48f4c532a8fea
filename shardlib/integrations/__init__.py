"""Update collection from other training libraries (``shardlib.integrations.trl``: Hugging Face TRL)."""
