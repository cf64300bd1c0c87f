import numpy as np
import numpy.typing as npt

def hash_ids(ids: npt.NDArray[np.uint64], seed: int, out: npt.NDArray[np.uint64]) -> None: ...
def shard_of_ids(
    ids: npt.NDArray[np.uint64], seed: int, num_shards: int, out: npt.NDArray[np.int64]
) -> None: ...
def partition_by_shard(
    ids: npt.NDArray[np.uint64],
    seed: int,
    num_shards: int,
    order: npt.NDArray[np.int64],
    offsets: npt.NDArray[np.int64],
) -> None: ...
def gather_rows(
    src: npt.NDArray[np.uint8], pos: npt.NDArray[np.int64], out: npt.NDArray[np.uint8]
) -> None: ...
def scatter_rows(
    out: npt.NDArray[np.uint8], pos: npt.NDArray[np.int64], src: npt.NDArray[np.uint8]
) -> None: ...
