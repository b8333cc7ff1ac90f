"""The demo recipe's frame-rate measures: the frame-locked training term and the evaluation's modulation figure
must see a pulse that repeats with the codec frame and not the music's own loudness changes."""
from __future__ import annotations

import pytest
import torch
from demo_recipe import import_recipe


codec_losses, common = import_recipe("codec_losses", "common")
frame_locked_loss, frame_rate_line_loss = codec_losses.frame_locked_loss, codec_losses.frame_rate_line_loss
frame_rate_modulation = common.frame_rate_modulation
HOP, SAMPLE_RATE = common.HOP, common.SAMPLE_RATE


def tone(seconds: float, generator: torch.Generator) -> torch.Tensor:
    """Two sustained partials with a slow (3 Hz) tremolo and a little noise: music-like, nothing at 50 Hz."""
    t = torch.arange(int(seconds * SAMPLE_RATE)) / SAMPLE_RATE
    tremolo = 1 + 0.3 * torch.sin(2 * torch.pi * 3 * t)
    partials = torch.sin(2 * torch.pi * 220 * t) + 0.5 * torch.sin(2 * torch.pi * 661 * t + 1.0)
    return 0.1 * tremolo * partials + 0.001 * torch.randn(len(t), generator=generator)


def frame_pulse(length: int, depth: float, phase: int = 0) -> torch.Tensor:
    """A gain that dips by `depth` for 2 ms once per codec frame: the decoder's buzz."""
    position = (torch.arange(length) - phase) % HOP
    return 1 - depth * (position < 2 * SAMPLE_RATE // 1000).float()


def test_frame_locked_loss_sees_the_frame_pulse_and_nothing_else() -> None:
    generator = torch.Generator().manual_seed(0)
    target = torch.stack([tone(1.0, generator), 3 * tone(1.0, generator)])
    assert float(frame_locked_loss(target, target)) < 1e-5  # the square root's floor
    # an error that does not repeat with the frame (noise, a level change) costs little
    noisy = target * 0.8 + 0.01 * torch.randn(target.shape, generator=generator)
    pulsed = target * frame_pulse(target.shape[-1], 0.2)
    assert float(frame_locked_loss(pulsed, target)) > 5 * float(frame_locked_loss(noisy, target))
    # relative to each row's level: the loud row's pulse costs what the soft row's does
    soft, loud = (frame_locked_loss(pulsed[i : i + 1], target[i : i + 1]) for i in range(2))
    assert float(soft) == pytest.approx(float(loud), rel=0.2)
    # and it is differentiable, pushing the pulse's depth back towards none
    depth = torch.tensor(0.2, requires_grad=True)
    frame_locked_loss(target * (1 - depth * (frame_pulse(target.shape[-1], 1.0) < 1).float()), target).backward()
    assert depth.grad is not None and float(depth.grad) > 0


def test_frame_rate_line_loss_weighs_the_pulse_where_it_is_heard() -> None:
    generator = torch.Generator().manual_seed(2)
    steady = torch.stack([tone(1.0, generator), 0.2 * tone(1.0, generator)])
    assert float(frame_rate_line_loss(steady, steady)) == 0.0
    depths = (0.001, 0.005, 0.02)
    losses = [float(frame_rate_line_loss(steady * frame_pulse(steady.shape[-1], depth, 37), steady)) for depth in depths]
    assert 0 < losses[0] < losses[1] < losses[2]
    # music whose envelope moves at every frequency (noise bursts) masks the same pulse
    bursts = steady * (1 + 3 * torch.rand(steady.shape[0], steady.shape[-1] // 24, generator=generator).repeat_interleave(24, -1))
    assert float(frame_rate_line_loss(bursts * frame_pulse(steady.shape[-1], 0.005, 37), bursts)) < 0.2 * losses[1]
    # a target that itself moves at the frame rate is not an error to copy
    tremolo = steady * frame_pulse(steady.shape[-1], 0.02, 37)
    assert float(frame_rate_line_loss(tremolo, tremolo)) == 0.0


def test_frame_rate_modulation_reads_the_pulse_against_the_musics_own_motion() -> None:
    generator = torch.Generator().manual_seed(1)
    clean = tone(4.0, generator)[None]
    assert float(frame_rate_modulation(clean)) < 1.5
    # a pulse at any phase within the frame shows at the frame rate
    for phase in (0, 131):
        assert float(frame_rate_modulation(clean * frame_pulse(clean.shape[-1], 0.1, phase))) > 3
