"""Samplers: from the prior to molecules.

* `sampler`: `AbstractSampler` (prior -> solve -> finish, once) and the final `Ancestral`, `DDIM`, `PFODE`
  (any diffrax solver), `ReverseSDE`, `Consistency`; `sampler(denoiser, mask, n_feat, *, key)` draws ONE molecule.
* `steps`: the per-step numerics and `*_solve` loops (reused by objectives).
* `batching`: many molecules in fixed-shape compiled batches, decoded on the host.
"""

from .batching import (
    PARTIAL_BATCH_MULTIPLE as PARTIAL_BATCH_MULTIPLE,
    SamplerFn as SamplerFn,
    Samples as Samples,
    buckets_for as buckets_for,
    capacities as capacities,
    compile_sampler as compile_sampler,
    decode as decode,
    draw_sizes as draw_sizes,
    sample_molecules as sample_molecules,
)
from .sampler import (
    DDIM as DDIM,
    PFODE as PFODE,
    AbstractSampler as AbstractSampler,
    Ancestral as Ancestral,
    Consistency as Consistency,
    ReverseSDE as ReverseSDE,
)
from .steps import (
    CT_MIDPOINT as CT_MIDPOINT,
    NFE as NFE,
    Times as Times,
    ancestral_mean_std as ancestral_mean_std,
    ancestral_solve as ancestral_solve,
    ancestral_step as ancestral_step,
    consistency_solve as consistency_solve,
    consistency_times as consistency_times,
    ddim_solve as ddim_solve,
    ddim_step as ddim_step,
    edm_final_decode as edm_final_decode,
    pf_ode_solve as pf_ode_solve,
    reverse_sde_solve as reverse_sde_solve,
    sigmas_to_times as sigmas_to_times,
)
