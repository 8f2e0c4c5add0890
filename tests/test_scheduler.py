import pytest
import torch
from diffusers import FlowMatchEulerDiscreteScheduler
from diffusers.pipelines.z_image.pipeline_z_image import calculate_shift as ref_shift, get_default_z_image_sigmas

from zimage_deploy.runtime.scheduler import FlowMatchEuler, SchedulerConfig


@pytest.mark.parametrize("steps", [1, 8, 28, 50])
@pytest.mark.parametrize("cfg", [dict(shift=3.0), dict(shift=1.5), dict(use_dynamic_shifting=True)])
@pytest.mark.parametrize("seq_len", [64, 4096])
def test_schedule_and_step_match_diffusers(steps, cfg, seq_len):
    ref = FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, **cfg)
    mu = ref_shift(seq_len, 256, 4096, 0.5, 1.15)
    ref.set_timesteps(sigmas=get_default_z_image_sigmas(steps), mu=mu)
    ref.set_begin_index(0)
    ours = FlowMatchEuler(SchedulerConfig.from_diffusers(dict(ref.config)), steps, seq_len)
    torch.testing.assert_close(ours.timesteps, ref.timesteps, rtol=0, atol=0)
    torch.testing.assert_close(ours.sigmas, ref.sigmas, rtol=0, atol=0)
    g = torch.Generator().manual_seed(steps)
    x = torch.randn(1, 16, 4, 4, generator=g)
    for i, t in enumerate(ref.timesteps):
        v = torch.randn(1, 16, 4, 4, generator=g)
        expected = ref.step(v, t, x, return_dict=False)[0]
        x_ours = ours.step(v, i, x)
        torch.testing.assert_close(x_ours, expected, rtol=0, atol=0)
        x = expected


def test_unsupported_options_refused():
    with pytest.raises(ValueError, match="use_karras_sigmas"):
        SchedulerConfig.from_diffusers({"use_karras_sigmas": True})
