def test_collection_overhead_compares_collecting_steps_with_the_others():
    import json

    import numpy as np
    import xarray as xr

    from shardlib.report_smollm import collection_overhead

    sec = np.array([9.0, 1.0, 1.0, 3.0, 1.0, 1.0, 3.0])  # every third step collects; step 0 is the warm-up
    ds = xr.Dataset({"steps_per_s": ("step", 1 / sec)}, coords={"step": np.arange(7)})
    ds.attrs["config"] = json.dumps({"collect_every": 3})
    assert collection_overhead(ds) == 3.0
    ds.attrs["config"] = json.dumps({"collect_every": 1})
    assert np.isnan(collection_overhead(ds))
