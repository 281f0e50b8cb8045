"""Generate (noise, teacher ODE output) pairs with Ray Data, into Parquet shards on local disk or S3.

    python jobs/generate_pairs.py --teacher tiny --prompts prompts.txt --num-pairs 4096 --out s3://bucket/pairs
    ray job submit --working-dir . -- python jobs/generate_pairs.py --config my.yaml

Each missing shard is one Ray Data row; an actor pool (one actor per GPU by default) runs the teacher's guided ODE
sampler and writes whole shards, atomically. A rerun writes only the missing shards. dmd_ray/data/pairs.py has the
data contract, dmd_ray/config.py every config key (`--help` lists them).
"""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # the repo root, for `ray job submit --working-dir .`

from dmd_ray.config import PairsConfig, cli_main  # noqa: E402
from dmd_ray.distributed.pair_job import generate_pairs  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    return cli_main("generate_pairs", PairsConfig, generate_pairs, argv, __doc__.split("\n\n")[0])


if __name__ == "__main__":
    sys.exit(main())
