"""Mesh axis names, defined once (every other module imports them from here).

    DATA    data parallelism: the batch is split, parameters are replicated (pmap's only axis)
    FSDP    fully sharded data parallelism: the batch is split and parameters / optimizer states are
            sharded along their hidden (D) dimension, all-gathered for each use
    TENSOR  tensor (model) parallelism: heads and the MLP width (and the vocabulary) are split
    BATCH   the axes the batch is split over: (DATA, FSDP)
"""

DATA = "data"
FSDP = "fsdp"
TENSOR = "tensor"
BATCH = (DATA, FSDP)
MESH_AXES = (DATA, FSDP, TENSOR)
DATA_AXIS = DATA  # pmap's axis name
