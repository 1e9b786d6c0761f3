"""Flow matching for DiT adapters: noisy latents and the velocity target follow diffusers' flow-match scheduler,
timestep draws follow diffusers' densities per sample, the loss weights are SD3's, FLUX packing round-trips."""

from __future__ import annotations

import pytest
import torch
from diffusers import FlowMatchEulerDiscreteScheduler, FluxPipeline

from lookalike.training.data import slot_generator
from lookalike.training.flow import FlowSettings, draw_u, flow_inputs, flow_loss, pack_flux


def _x0_noise(shape=(3, 16, 8, 8)):
    g = torch.Generator().manual_seed(0)
    return torch.randn(shape, generator=g), torch.randn(shape, generator=g)


def test_noisy_latents_are_the_schedulers_forward_process_on_its_shifted_sigmas():
    scheduler = FlowMatchEulerDiscreteScheduler(shift=3.0)  # SD3's training schedule
    x0, noise = _x0_noise()
    u = torch.tensor([0.02, 0.5, 0.97])
    out = flow_inputs(scheduler, x0, noise, u, FlowSettings())
    expected = scheduler.scale_noise(x0, out["timesteps"], noise)
    torch.testing.assert_close(out["noisy"], expected, atol=1e-6, rtol=0)
    assert out["sigmas"][0] > out["sigmas"][1] > out["sigmas"][2], "u indexes the descending schedule, as diffusers"
    assert torch.allclose(out["timesteps"], out["sigmas"] * 1000, atol=1e-3)


def test_the_velocity_target_is_what_diffusers_euler_sampler_integrates():
    x0, noise = _x0_noise()
    out = flow_inputs(FlowMatchEulerDiscreteScheduler(shift=3.0), x0, noise, torch.full((3,), 0.6), FlowSettings())
    torch.testing.assert_close(out["target"], noise - x0)
    sampler = FlowMatchEulerDiscreteScheduler(shift=3.0)
    sampler.set_timesteps(4)
    sigma, after = float(sampler.sigmas[1]), float(sampler.sigmas[2])
    noisy = (1 - sigma) * x0 + sigma * noise
    stepped = sampler.step(out["target"], sampler.timesteps[1], noisy).prev_sample  # its second step
    torch.testing.assert_close(stepped, (1 - after) * x0 + after * noise, atol=1e-5, rtol=0)


@pytest.mark.parametrize("scheme,mean", [("none", 0.5), ("logit_normal", 0.5), ("mode", None)])
def test_each_sample_draws_its_u_from_its_own_generator(scheme, mean):
    settings = FlowSettings(weighting_scheme=scheme)
    draws = torch.stack([draw_u(settings, slot_generator(0, slot)) for slot in range(2000)])
    again = torch.stack([draw_u(settings, slot_generator(0, slot)) for slot in (5, 17)])
    assert torch.equal(again, draws[[5, 17]]), "a slot's draw does not depend on the others"
    assert 0 <= float(draws.min()) and float(draws.max()) < 1
    if mean is not None:
        assert abs(float(draws.mean()) - mean) < 0.03
    if scheme == "logit_normal":  # concentrated in the middle of the schedule, as SD3 trains
        assert float(((draws - 0.5).abs() < 0.25).float().mean()) > 0.6
    if scheme == "mode":  # mode_scale 1.29 draws the middle more often than a uniform draw does
        assert float(((draws - 0.5).abs() < 0.25).float().mean()) > 0.55


def test_sd3_loss_weights_weight_each_samples_error():
    x0, noise = _x0_noise()
    settings = FlowSettings(weighting_scheme="sigma_sqrt")
    out = flow_inputs(FlowMatchEulerDiscreteScheduler(shift=3.0), x0, noise, torch.tensor([0.1, 0.5, 0.9]), settings)
    torch.testing.assert_close(out["weighting"], out["sigmas"] ** -2.0)
    pred = torch.zeros_like(x0)
    manual = torch.stack([out["weighting"][i] * ((pred[i] - out["target"][i]) ** 2).mean() for i in range(3)]).mean()
    torch.testing.assert_close(flow_loss(pred, out["target"], out["weighting"]), manual)
    flat = flow_inputs(FlowMatchEulerDiscreteScheduler(shift=3.0), x0, noise, torch.tensor([0.1, 0.5, 0.9]),
                       FlowSettings())
    torch.testing.assert_close(flow_loss(pred, flat["target"], flat["weighting"]),
                               torch.nn.functional.mse_loss(pred, flat["target"]))


def test_flux_packing_round_trips_through_diffusers_unpacking():
    latents = torch.randn(2, 16, 8, 6)
    packed, ids = pack_flux(latents)
    assert packed.shape == (2, 4 * 3, 64) and ids.shape == (12, 3)
    torch.testing.assert_close(FluxPipeline._unpack_latents(packed, 8 * 8, 6 * 8, 8), latents, atol=0, rtol=0)
    assert ids[:, 0].eq(0).all() and ids[-1, 1:].tolist() == [3.0, 2.0]
