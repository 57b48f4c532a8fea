"""Parameter updates, one import away: the public names of the modules that hold them.

- :mod:`shardlib.factored`: factored matrix updates (``Factored``) and their algebra;
- :mod:`shardlib.ring`: the in-memory ring buffer of the most recent updates;
- :mod:`shardlib.store`: the on-disk store format, its writer, reader and checks, and helpers for sizes and norms;
- :mod:`shardlib.collector`: collecting per-event and per-step updates from a PyTorch loop, and the conventions.

Library modules import from those modules directly (a stage's fingerprint then covers only the code it uses);
``from shardlib.updates import ...`` stays for notebooks, scripts and users.
"""

from .collector import (
    UpdateCollector,
    check_convention,
    group_events,
    linear_patterns,
    non_linear_message,
    param_owners,
    select_params,
    selection_summary,
)
from .common import fmt_bytes
from .factored import (
    LEFT,
    RIGHT,
    Factored,
    best_rank,
    cat_factored,
    densify,
    factor_pairs,
    factorize,
    n_events,
    pad_factors,
    take,
)
from .ring import (
    RingBuffer,
)
from .store import (
    CHUNK_RE,
    DTYPES,
    MANIFEST_ENTRY,
    MAX_STORE_STEP,
    STORE_FORMAT,
    STORE_META,
    StoreError,
    UpdateStore,
    bytes_per_event,
    file_sha256,
    flat_updates,
    open_store,
    open_update_stores,
    update_norms,
    update_vars,
    validate_store,
    var_name,
)

__all__ = [
    "LEFT",
    "RIGHT",
    "Factored",
    "pad_factors",
    "cat_factored",
    "take",
    "n_events",
    "best_rank",
    "factorize",
    "factor_pairs",
    "densify",
    "RingBuffer",
    "DTYPES",
    "STORE_META",
    "STORE_FORMAT",
    "CHUNK_RE",
    "MAX_STORE_STEP",
    "MANIFEST_ENTRY",
    "StoreError",
    "var_name",
    "UpdateStore",
    "file_sha256",
    "open_store",
    "open_update_stores",
    "update_vars",
    "validate_store",
    "flat_updates",
    "bytes_per_event",
    "fmt_bytes",
    "update_norms",
    "select_params",
    "selection_summary",
    "check_convention",
    "UpdateCollector",
    "param_owners",
    "linear_patterns",
    "non_linear_message",
    "group_events",
]
