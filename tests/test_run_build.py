"""run/build.py, the one string -> object layer: every SDE, solver and sampler name maps to its object; SDE
properties (continuous twin, time resolution) drive the choices, not class names."""

import diffrax as dfx
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jaxtyping import TypeCheckError

from sde_mol import samplers
from sde_mol.cli import UsageError
from sde_mol.run.build import build_sde_from, sampler_from, solver_from_name
from sde_mol.run.configs import SamplerConfig, SDEConfig
from sde_mol.sde import VESDE, CosineVPSDE, DiscreteVPSDE, KarrasSDE, PolynomialVPSDE


def test_every_sde_name_builds_its_class_with_the_config_values():
    assert isinstance(build_sde_from(SDEConfig("vp_discrete", timesteps=200)), DiscreteVPSDE)
    assert build_sde_from(SDEConfig("vp_discrete", timesteps=200)).time_resolution == 200
    karras = build_sde_from(SDEConfig("karras", sigma_max=40.0))
    assert isinstance(karras, KarrasSDE) and karras.t_max == 40.0 and karras.time_resolution is None
    assert build_sde_from(SDEConfig("vp_polynomial", power=3.0)) == PolynomialVPSDE(3.0, 1e-5)
    assert isinstance(build_sde_from(SDEConfig("vp_cosine")), CosineVPSDE)
    assert build_sde_from(SDEConfig("ve", sigma_min=0.1, sigma_max=5.0)) == VESDE(0.1, 5.0)


def test_continuous_twin_is_a_method_of_the_sde():
    table = DiscreteVPSDE.edm_polynomial(200, 2.0, 1e-5)
    twin = table.continuous_twin()
    assert twin == PolynomialVPSDE(2.0, 1e-5) and twin.continuous_twin() is twin
    knots = jnp.arange(200) / 200.0
    np.testing.assert_allclose(jax.vmap(twin.gamma)(knots), jax.vmap(table.gamma)(knots), rtol=1e-4, atol=1e-4)
    with pytest.raises(ValueError, match="bare table"):
        DiscreteVPSDE(table.gamma_table).continuous_twin()
    other = DiscreteVPSDE(table.gamma_table, power=3.0, precision=1e-5)  # a table that is not its stated schedule
    with pytest.raises(ValueError, match="differs from its continuous twin"):
        other.continuous_twin()


def test_solver_names():
    for name, cls in [("euler", dfx.Euler), ("heun", dfx.Heun), ("midpoint", dfx.Midpoint), ("tsit5", dfx.Tsit5)]:
        assert isinstance(solver_from_name(name), cls)
    with pytest.raises((ValueError, TypeCheckError)):  # the Literal is checked at run time under jaxtyping
        solver_from_name("rk4")


def test_sampler_names_build_sampler_objects_and_respect_the_sde_resolution():
    sde = DiscreteVPSDE.edm_polynomial(200)
    built = {
        name: sampler_from(SamplerConfig(name, steps=4, solver="midpoint", eta=0.5), sde)
        for name in ("ancestral", "ddim", "pf_ode", "reverse_sde", "consistency")
    }
    assert built["ancestral"] == samplers.Ancestral(4)
    assert built["ddim"] == samplers.DDIM(4, eta=0.5)
    assert isinstance(built["pf_ode"].solver, dfx.Midpoint) and built["pf_ode"].n_steps == 4
    assert built["reverse_sde"] == samplers.ReverseSDE(4)
    assert built["consistency"].ts.shape == (3,)
    with pytest.raises(UsageError, match="at most its T = 200"):
        sampler_from(SamplerConfig("ancestral", steps=400), sde)
    assert sampler_from(SamplerConfig("ancestral", steps=400), sde.continuous_twin()).n_steps == 400
    with pytest.raises(ValueError, match="resolves 200 time steps"):  # the class checks too, without the config
        samplers.Ancestral(400).times(sde)
