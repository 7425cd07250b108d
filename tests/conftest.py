import os

# Small CPU ops under thread contention run far slower with 2 intra-op threads (ENV_NOTES); tests use one.
os.environ.setdefault("OMP_NUM_THREADS", "1")

import torch  # noqa: E402

torch.set_num_threads(1)
