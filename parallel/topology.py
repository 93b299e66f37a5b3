"""The one source of ranks and process groups: world = dp x sp x tp (tp innermost, then sp, dp).

    global rank = (dp_rank * sp + sp_rank) * tp + tp_rank

so a tp group is `tp` consecutive ranks (inside a node), an sp group strides by `tp`, a dp group
by `sp * tp`. Gradients of replicated weights are reduced over dp x sp (sp ranks hold the same
weights and different tokens of the same sequences); tp is model parallel.

`ParallelDims` validates the degrees and does the rank arithmetic without touching
torch.distributed; `build_groups()` creates every process group (every rank creates every group,
in the same order, as torch.distributed requires); `mpu()` hands them to DeepSpeed.
"""
from __future__ import annotations

import torch.distributed as dist

DIMS = ("dp", "sp", "tp")


class ParallelDims:
    """Degrees of data, sequence and tensor parallelism over `world_size` processes."""

    def __init__(self, dp: int, sp: int, tp: int, world_size: int):
        for name, value in (("dp", dp), ("sp", sp), ("tp", tp), ("world_size", world_size)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"parallel.{name} must be a positive int; got {value!r}")
        if dp * sp * tp != world_size:
            raise ValueError(f"parallel dims dp={dp} x sp={sp} x tp={tp} = {dp * sp * tp} must equal "
                             f"the world size {world_size}")
        self.dp, self.sp, self.tp, self.world_size = dp, sp, tp, world_size
        self._groups = None

    @classmethod
    def from_world(cls, sp: int = 1, tp: int = 1, world_size: int | None = None) -> "ParallelDims":
        """dp inferred as world_size / (sp * tp); world_size defaults to torch.distributed's."""
        if world_size is None:
            world_size = dist.get_world_size() if dist.is_initialized() else 1
        for name, value in (("sp", sp), ("tp", tp)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"parallel.{name} must be a positive int; got {value!r}")
        if world_size % (sp * tp):
            raise ValueError(f"world size {world_size} is not divisible by parallel.sp={sp} x "
                             f"parallel.tp={tp} = {sp * tp}")
        return cls(world_size // (sp * tp), sp, tp, world_size)

    def __repr__(self):
        return f"ParallelDims(dp={self.dp}, sp={self.sp}, tp={self.tp}, world_size={self.world_size})"

    # -- rank arithmetic (no torch.distributed) -------------------------------------------------

    def coords(self, rank: int) -> tuple[int, int, int]:
        """(dp_rank, sp_rank, tp_rank) of a global rank."""
        if not 0 <= rank < self.world_size:
            raise ValueError(f"rank {rank} outside the world [0, {self.world_size})")
        return rank // (self.sp * self.tp), (rank // self.tp) % self.sp, rank % self.tp

    def rank_of(self, dp_rank: int, sp_rank: int, tp_rank: int) -> int:
        return (dp_rank * self.sp + sp_rank) * self.tp + tp_rank

    def group_ranks(self, dim: str) -> list[list[int]]:
        """Every group of one kind as lists of global ranks: dim in tp | sp | dp | dp_sp."""
        sizes = {"dp": self.dp, "sp": self.sp, "tp": self.tp}
        if dim in sizes:
            varying = (dim,)
        elif dim == "dp_sp":
            varying = ("dp", "sp")
        else:
            raise ValueError(f"unknown group kind {dim!r}; valid: tp, sp, dp, dp_sp")
        fixed = [d for d in DIMS if d not in varying]
        groups = []
        for fixed_coords in _product([sizes[d] for d in fixed]):
            ranks = []
            for var_coords in _product([sizes[d] for d in varying]):
                c = dict(zip(fixed, fixed_coords)) | dict(zip(varying, var_coords))
                ranks.append(self.rank_of(c["dp"], c["sp"], c["tp"]))
            groups.append(sorted(ranks))
        return groups

    # -- validation of model shapes against the degrees -----------------------------------------

    def check_tp_divisible(self, value: int, key: str) -> None:
        """Raise a one-line ValueError unless config value `key` (heads, channels, vocab) % tp == 0."""
        _check_divisible(value, self.tp, key, "parallel.tp")

    def check_sp_divisible(self, value: int, key: str) -> None:
        """Raise a one-line ValueError unless config value `key` (sequence length) % sp == 0."""
        _check_divisible(value, self.sp, key, "parallel.sp")

    # -- process groups -------------------------------------------------------------------------

    def build_groups(self) -> "ParallelDims":
        """Create the tp, sp, dp and dp x sp groups; collective: every rank must call it.

        Without an initialised torch.distributed a world of one needs no groups: every group is
        None, which parallel/ treats as "a group of one process".
        """
        if not dist.is_initialized():
            if self.world_size != 1:
                raise RuntimeError(f"{self!r}: torch.distributed is not initialised")
            self._groups = dict(rank=0, tp=None, sp=None, dp=None, dp_sp=None,
                                ranks=dict(tp=[0], sp=[0], dp=[0], dp_sp=[0]))
            return self
        if dist.get_world_size() != self.world_size:
            raise ValueError(f"{self!r} does not match the torch.distributed world size "
                             f"{dist.get_world_size()}")
        rank = dist.get_rank()
        built = dict(rank=rank, ranks={})
        for dim in ("tp", "sp", "dp", "dp_sp"):
            for ranks in self.group_ranks(dim):
                group = dist.new_group(ranks)  # collective over the world, even for other groups
                if rank in ranks:
                    built[dim], built["ranks"][dim] = group, ranks
        self._groups = built
        return self

    def _built(self):
        if self._groups is None:
            raise RuntimeError(f"{self!r}: call build_groups() first")
        return self._groups

    @property
    def rank(self) -> int:
        return self._built()["rank"]

    @property
    def dp_rank(self) -> int:
        return self.coords(self.rank)[0]

    @property
    def sp_rank(self) -> int:
        return self.coords(self.rank)[1]

    @property
    def tp_rank(self) -> int:
        return self.coords(self.rank)[2]

    @property
    def tp_group(self):
        return self._built()["tp"]

    @property
    def sp_group(self):
        return self._built()["sp"]

    @property
    def dp_group(self):
        return self._built()["dp"]

    @property
    def dp_sp_group(self):
        """The group over which gradients of replicated weights are reduced and ZeRO shards."""
        return self._built()["dp_sp"]

    def ranks_in(self, dim: str) -> list[int]:
        """Global ranks of this process's group of kind tp | sp | dp | dp_sp."""
        return list(self._built()["ranks"][dim])

    def mpu(self) -> "DeepSpeedMPU":
        self._built()
        return DeepSpeedMPU(self)


class DeepSpeedMPU:
    """The `mpu` object deepspeed.initialize(mpu=...) queries (names as DeepSpeed 0.19 calls them).

    - model parallel = tensor parallel = the tp group; DeepSpeed counts params without
      `tensor_model_parallel=True` only on tp rank 0 in the global grad norm.
    - data parallel = the dp group (sets DeepSpeed's batch-size arithmetic: batch = micro x
      accumulation x dp).
    - sequence parallel = the sp group, and sequence-data parallel = dp x sp: DeepSpeed shards
      ZeRO state and all-reduces gradients over dp x sp, dividing by dp only (DeepSpeed-Ulysses
      convention), i.e. gradients are summed over sp ranks. Each sp rank must therefore
      normalise its loss by the token count of the whole sequences (all sp pieces), not of its
      own piece; then the result equals single-device mean-loss training.
    There is deliberately no `initialize_sequence_parallel` (DeepSpeed would then ignore tp).
    """

    def __init__(self, dims: ParallelDims):
        self.dims = dims

    def _size(self, group):
        return 1 if group is None else dist.get_world_size(group)

    def _rank(self, group):
        return 0 if group is None else dist.get_rank(group)

    # tensor / model parallel
    def get_model_parallel_group(self):
        return self.dims.tp_group

    def get_model_parallel_rank(self):
        return self.dims.tp_rank

    def get_model_parallel_world_size(self):
        return self.dims.tp

    get_tensor_model_parallel_group = get_model_parallel_group
    get_tensor_model_parallel_rank = get_model_parallel_rank
    get_tensor_model_parallel_world_size = get_model_parallel_world_size

    def get_tensor_model_parallel_src_rank(self):
        return self.dims.ranks_in("tp")[0]

    # data parallel
    def get_data_parallel_group(self):
        return self.dims.dp_group

    def get_data_parallel_rank(self):
        return self.dims.dp_rank

    def get_data_parallel_world_size(self):
        return self.dims.dp

    def get_data_parallel_group_ranks(self):
        return self.dims.ranks_in("dp")

    # sequence parallel
    def get_sequence_parallel_group(self):
        return self.dims.sp_group

    def get_sequence_parallel_rank(self):
        return self.dims.sp_rank

    def get_sequence_parallel_world_size(self):
        return self.dims.sp

    def get_sequence_data_parallel_group(self):
        return self.dims.dp_sp_group

    def get_sequence_data_parallel_rank(self):
        return self.dims.dp_rank * self.dims.sp + self.dims.sp_rank

    def get_sequence_data_parallel_world_size(self):
        return self.dims.dp * self.dims.sp

    # no pipeline parallelism
    def get_pipeline_model_parallel_world_size(self):
        return 1

    def get_pipeline_model_parallel_rank(self):
        return 0


def _check_divisible(value, degree, key, degree_key):
    if value % degree:
        raise ValueError(f"{key}={value} is not divisible by {degree_key}={degree}")


def _product(sizes):
    """All coordinate tuples of a grid, last coordinate fastest."""
    out = [()]
    for n in sizes:
        out = [c + (i,) for c in out for i in range(n)]
    return out
