"""Progress bars of the long technique calls: shown with ``progress=True`` (the CLI's setting), silent otherwise.

A full-size model's prune / GPTQ / reconstruction sweeps ran for many minutes with no output from the CLI."""

from diffusion_accel.progress import progress_bar, progress_shown, showing_progress
from diffusion_accel.prune import PruneConfig, prune_
from diffusion_accel.quant import PTQConfig, quantize_
from diffusion_accel.testing.tiny import build_tiny

FLUX_CALIB = dict(calib_prompts=1, calib_num_steps=2, calib_steps="all", calib_kwargs=(("height", 16), ("width", 16)))


def test_progress_is_off_outside_and_restored_after_the_block():
    assert not progress_shown() and list(progress_bar([1, 2], "x")) == [1, 2]
    with showing_progress(True):
        assert progress_shown()
        with showing_progress(False):
            assert not progress_shown()
        assert progress_shown()
    assert not progress_shown()


def test_prune_shows_its_group_bar_only_when_asked(capsys):
    config = PruneConfig(method="obs", sparsity=0.5, groups=2, calib_prompts=1, calib_num_steps=2)
    prune_(build_tiny("sd"), config)
    assert "prune groups" not in capsys.readouterr().err
    prune_(build_tiny("sd"), config, progress=True)
    err = capsys.readouterr().err
    assert "prune groups" in err and "calibrate" in err
    assert not progress_shown()


def test_quantize_shows_calibration_gptq_and_reconstruction_bars_only_when_asked(capsys):
    gptq = PTQConfig(weights="int4", activations=None, weight_rounding="gptq", gptq_groups=2, **FLUX_CALIB)
    recon = PTQConfig(weights="int4", reconstruct=True, recon_iters=2, recon_act_iters=1, recon_samples=2,
                      recon_batch=2, **FLUX_CALIB)
    quantize_(build_tiny("flux"), gptq)
    assert capsys.readouterr().err.count("it/s") == 0
    quantize_(build_tiny("flux"), gptq, progress=True)
    assert "GPTQ layer groups" in capsys.readouterr().err
    quantize_(build_tiny("flux"), recon, progress=True)
    err = capsys.readouterr().err
    assert "reconstruct blocks" in err and "calibrate" in err
    assert not progress_shown()
