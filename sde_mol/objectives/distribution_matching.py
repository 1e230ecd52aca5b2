"""Distribution matching distillation (DMD; Yin et al. 2024, "One-step diffusion with distribution matching
distillation", and its multi-step form, DMD2, Yin et al. 2024) of a diffusion teacher into a few-step generator,
as FlashMol (Wei et al. 2026) adapts it to molecules.

Two networks train together, both copies of the teacher at the start:

* the generator G, sampled as a k-step ancestral chain (DDIM with eta = 1 on a grid t_0 = t_max > t_1 > ... >
  t_k = t_min of a continuous-time SDE, then one last x0 call: `samplers.DDIM(k, eta=1, grid)`). A copy of the
  teacher sampled so is the teacher's respaced k-step ancestral sampler, the starting point FlashMol found DMD
  needs (DMD only moves a generator locally). On EDM's schedule the Karras grid is the better start: the
  uniform grid's first step jumps from alpha = 0.003 to 0.44 carrying the x0 guess made at alpha = 0.003 (the
  eps error times ~300), and some chains explode (|x| > 100; measured on the default model, 4 steps);
* the fake denoiser F, which follows the distribution of G's samples (EDM's eps loss on them, t uniform in
  [t_low, t_high]).

One loss term, for one molecule's mask (the data molecule itself is not used; only its size):

    z_{t_0} ~ prior; z_{t_{j+1}} = DDIM_eta(G, z_{t_j}) for j < k - 1          (the chain, as sampled)
    x  = G(t_{k-1}, z_{t_{k-1}})                                 the generator's sample (the sampler's last call
                                                                 at t_min, a near identity, left out)
    t ~ U(t_low, t_high);  x_t = alpha_t x + sigma_t eps         (x without gradient)
    g  = (F(t, x_t) - D(t, x_t)) / mean|x - D(t, x_t)|           D: the teacher (the "real" denoiser)
    L_G = 0.5 ||x - sg(x - g)||^2 / dim                          its gradient in x is g / dim
    L_F = ||eps' - F_eps(t', alpha_t' sg(x) + sigma_t' eps')||^2 / dim,   t' ~ U(t_low, t_high)

(with `low_noise_fraction` p > 0 both levels are drawn from U(t_low, low_noise_t_max) with probability p: the
teacher's eps error on few-step samples is ~50x its error on data at t <= 0.01 and matches it above t = 0.4,
measured by experiments/sample_levels.py, so the low levels are where the generator is wrong)

g is the x0 form of the gradient of KL(p_G,t || p_data,t) at x_t: the score difference s_fake - s_real equals
alpha_t (F - D) / sigma_t^2, and DMD drops the level's factor for the per-molecule normaliser mean|x - D|. The
loss is L_G + L_F: L_G reaches only G's weights (F and D are evaluated without gradient), L_F only F's (x is
stopped), so one optimiser step updates both networks (DMD2 updates F more often than G;
`recipes/dmd_distill.py` gives F a larger lr instead, `--fake-lr-scale`). `GeneratorPair.net` is what the
training step differentiates. F is trained only at the levels where it is used: below t_low the eps loss of
samples off the data's manifold grows like (distance / sigma_t)^2 (sigma ~ 0.003 at t = 0 on EDM's schedule),
and single molecules made it spike to thousands per dimension (measured). The teacher may be a
`GuidedDenoiser`: G then learns the guided distribution (as DMD distils a classifier-free-guided score).

Which outputs are matched. DMD2 matches the x0 output of every chain step (its "backward simulation"). An EDM
eps network's x0 at the first steps is (z - sigma eps_hat) / alpha with alpha(t = 1) ~ 0.003: its eps error
times ~300, far off the data (measured: a fake eps loss of ~3,600 per dimension on such outputs), and the
sampler only uses it scaled back by alpha. Here only the chain's final output is matched: with
`chain_gradient=False` the gradient reaches G through its last call (the steps before it are G's own, without
gradient: they adapt through the weights they share with it); with `chain_gradient=True` it flows back through
every step of the chain (k times the generator's cost), so all steps learn to serve the final sample.
"""

import equinox as eqx
import jax
import jax.numpy as jnp
import jax.random as jr

from ..denoisers import AbstractDenoiser
from ..molecule import Molecule, com_free_normal, project, squared_error, state_dim
from ..samplers import ddim_step
from ..schedules import GridSpacing, time_grid
from ..typing import IntScalar, Key, NodeMask
from .base import AbstractObjective
from .denoising import _frozen


class GeneratorPair(eqx.Module):
    """DMD's two trained networks: the few-step `generator` (what is shipped) and the `fake` denoiser of its
    samples. `net` is both networks (what `training.state` trains); the SDE is the generator's."""

    generator: AbstractDenoiser
    fake: AbstractDenoiser

    @property
    def net(self):
        return (self.generator.net, self.fake.net)

    @property
    def sde(self):
        return self.generator.sde


def _mean_abs(a: Molecule, b: Molecule, mask: NodeMask, dim) -> jax.Array:
    m = mask[:, None]
    total = jnp.sum(jnp.where(m, jnp.abs(a.positions - b.positions), 0.0))
    return (total + jnp.sum(jnp.where(m, jnp.abs(a.features - b.features), 0.0))) / dim


class DistributionMatching(AbstractObjective):
    """The DMD loss of a `GeneratorPair` against a frozen `teacher` (module docstring). `n_steps` k: the
    generator's chain length; (t_low, t_high): the noise levels of the matching gradient (DMD: 0.02-0.98 of the
    schedule); `eta`: the chain's DDIM eta (1: ancestral); `chain_gradient`: backpropagate through the chain;
    `grid`, `rho`: the chain's time grid (`schedules.time_grid`, as the DDIM sampler's); `low_noise_fraction`,
    `low_noise_t_max`: `draw_level`'s share of levels below t_max (0: DMD's uniform draw)."""

    teacher: AbstractDenoiser
    n_steps: int = eqx.field(static=True, default=4)
    t_low: float = eqx.field(static=True, default=0.02)
    t_high: float = eqx.field(static=True, default=0.98)
    eta: float = eqx.field(static=True, default=1.0)
    chain_gradient: bool = eqx.field(static=True, default=False)
    grid: GridSpacing = eqx.field(static=True, default="uniform")
    rho: float = eqx.field(static=True, default=7.0)
    low_noise_fraction: float = eqx.field(static=True, default=0.0)
    low_noise_t_max: float = eqx.field(static=True, default=0.1)

    def __check_init__(self):
        if self.n_steps < 1:
            raise ValueError(f"DistributionMatching: n_steps {self.n_steps} must be >= 1")
        if not 0.0 <= self.t_low < self.t_high <= 1.0:
            raise ValueError(
                f"DistributionMatching: expected 0 <= t_low < t_high <= 1, got {self.t_low}, {self.t_high}"
            )
        if not 0.0 <= self.low_noise_fraction <= 1.0:
            raise ValueError(
                f"DistributionMatching: low_noise_fraction {self.low_noise_fraction}: expected a share in [0, 1]"
            )
        if self.low_noise_fraction > 0 and not self.t_low < self.low_noise_t_max <= self.t_high:
            raise ValueError(
                f"DistributionMatching: low_noise_t_max {self.low_noise_t_max}: expected t_low < it <= t_high "
                f"({self.t_low}, {self.t_high})"
            )

    def draw_level(self, key: Key) -> jax.Array:
        """A matching (and fake-training) level: U(t_low, t_high), or with probability `low_noise_fraction`
        U(t_low, low_noise_t_max) (the levels that resolve bond lengths get that much more of the signal)."""
        if self.low_noise_fraction == 0.0:  # the draw of runs before the option existed, key for key
            return jr.uniform(key, (), minval=self.t_low, maxval=self.t_high)
        k_low, k_t = jr.split(key)
        top = jnp.where(jr.bernoulli(k_low, self.low_noise_fraction), self.low_noise_t_max, self.t_high)
        return self.t_low + (top - self.t_low) * jr.uniform(k_t, ())

    def generator_x0(self, generator: AbstractDenoiser, mask: NodeMask, n_feat: int, key: Key) -> Molecule:
        """G's sample from a fresh prior draw: the chain's last x0 (the chain before it carries a gradient only
        with `chain_gradient`)."""
        sde = generator.sde
        ts = time_grid(sde, self.n_steps, self.grid, self.rho)
        k_prior, k_chain = jr.split(key)
        chain = generator if self.chain_gradient else _frozen(generator)

        def body(j, z):
            return ddim_step(chain, sde, ts[j + 1], ts[j], z, mask, eta=self.eta, key=jr.fold_in(k_chain, j))

        z = jax.lax.fori_loop(0, self.n_steps - 1, body, sde.prior(mask, n_feat, key=k_prior))
        return generator(ts[self.n_steps - 1], z, mask)

    def matching_gradient(self, fake: AbstractDenoiser, x: Molecule, mask: NodeMask, key: Key) -> Molecule:
        """g of the module docstring at a random level (no gradient through it)."""
        k_t, k_e = jr.split(key)
        sde = self.teacher.sde
        t = self.draw_level(k_t)
        alpha, sigma = sde.marginal(t)
        x = jax.lax.stop_gradient(x)
        x_t = project(alpha * x + sigma * com_free_normal(k_e, mask, x.n_feat, x.positions.dtype), mask)
        real = self.teacher(t, x_t, mask)
        scale = _mean_abs(x, real, mask, state_dim(mask, x.n_feat))
        return jax.lax.stop_gradient((_frozen(fake)(t, x_t, mask) - real) / jnp.maximum(scale, 1e-6))

    def loss_one(self, model: GeneratorPair, mol: Molecule, mask: NodeMask, *, key: Key, step: IntScalar, target=None):
        k_x, k_g, k_t, k_e = jr.split(key, 4)
        n_feat, dim = mol.n_feat, state_dim(mask, mol.n_feat)
        x = self.generator_x0(model.generator, mask, n_feat, k_x)
        g = self.matching_gradient(model.fake, x, mask, k_g)
        loss_g = 0.5 * squared_error(x, jax.lax.stop_gradient(x - g), mask) / dim
        t = self.draw_level(k_t)
        alpha, sigma = model.fake.sde.marginal(t)
        eps = com_free_normal(k_e, mask, n_feat, mol.positions.dtype)
        z = project(alpha * jax.lax.stop_gradient(x) + sigma * eps, mask)
        loss_f = squared_error(eps, model.fake.eps(t, z, mask), mask) / dim
        return loss_g + loss_f, {"dmd": loss_g, "fake": loss_f}
