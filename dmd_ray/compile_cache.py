"""torch.compile's caches carried between processes: what one process compiled (Inductor's kernels, AOTAutograd's
graphs; not Dynamo's tracing) saved as one file, local or s3://, and handed to torch.compile by the next process
before it compiles, so that a resumed training run or a restarted serving replica skips most of the compilation.
Loading unpickles the file: keep it where only the jobs' owners write, as checkpoints."""
from __future__ import annotations

import torch

from dmd_ray.data import storage


def load(uri: str) -> bool:
    """Loads the artifacts at `uri` if there are any; True when some were loaded. Call before anything compiles."""
    if not uri or not storage.exists(uri):
        return False
    return torch.compiler.load_cache_artifacts(storage.read_bytes(uri)) is not None


def save(uri: str) -> int:
    """Writes what this process compiled to `uri`; the bytes written (0 when nothing)."""
    if not uri:
        return 0
    artifacts = torch.compiler.save_cache_artifacts()
    if artifacts is None:
        return 0
    storage.write_bytes(uri, artifacts[0])
    return len(artifacts[0])


def summary() -> str:
    """What this process compiled so far, and how much of it came from a cache (this machine's, or a loaded file):
    Dynamo graphs traced, and the Inductor and AOTAutograd graphs found against compiled."""
    from torch._dynamo.utils import counters  # torch's own counters; absent keys read 0

    inductor, aot = counters["inductor"], counters["aot_autograd"]
    return (f"{counters['stats']['unique_graphs']} graphs traced; Inductor {inductor['fxgraph_cache_hit']} cached, "
            f"{inductor['fxgraph_cache_miss']} compiled; AOTAutograd {aot['autograd_cache_hit']} cached, {aot['autograd_cache_miss']} compiled")
