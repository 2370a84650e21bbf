"""AdaRound block reconstruction lowers block output error vs plain rounding."""

import pytest
import torch
from torch import nn

from diffusion_accel.quant import PTQConfig, quantize_
from diffusion_accel.quant.build import weight_codes
from diffusion_accel.quant.layers import QuantLinear
from diffusion_accel.quant.reconstruct import AdaRound, reconstruct_block
from diffusion_accel.testing.tiny import build_tiny, tiny_call_kwargs


def _tiny_block():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(32, 64), nn.GELU(), nn.Linear(64, 32))


def _quantize_block(block, config):
    originals = {}
    for index in (0, 2):
        source = block[index]
        codes, scale, sizes = weight_codes(source, config, None)
        originals[str(index)] = source
        block[index] = QuantLinear(source, codes, scale, sizes, config.weights, None)
    return originals


def test_adaround_initialises_at_the_float_weight():
    w = torch.randn(4, 16)
    scale = w.abs().amax(1, keepdim=True) / 7
    rounding = AdaRound(w, scale, (16,), "int4")
    assert (rounding() - w).abs().max() < 1e-3 * scale.max() + 1e-4


def test_reconstruction_beats_nearest_rounding_on_a_block():
    config = PTQConfig(weights="int4", activations=None, recon_iters=300, recon_batch=32, recon_lr=1e-2)
    block = _tiny_block()
    float_block = _tiny_block()
    x = torch.randn(256, 32)
    target = float_block(x).detach()
    originals = _quantize_block(block, config)
    with torch.no_grad():
        nearest_error = (block(x) - target).pow(2).mean()
    batches = lambda idx: ((x[idx],), {}, target[idx])  # noqa: E731
    layers = {name: block[int(name)] for name in originals}
    reconstruct_block(block, layers, originals, batches, 256, config)
    with torch.no_grad():
        learned_error = (block(x) - target).pow(2).mean()
    assert block[0].rounding is None and block[0].weight_codes.dtype == torch.int8
    assert block[0].weight_codes.abs().max() <= 8
    assert learned_error < 0.8 * nearest_error


def test_reconstruction_loss_counts_every_stream():
    """Flux's blocks return the text and the image stream: only the first (text) one was reconstructed."""
    from diffusion_accel.quant.reconstruct import reconstruction_loss

    image, text = torch.zeros(2, 3, 4, 4), torch.zeros(2, 5, 6)
    assert reconstruction_loss([image + 2], [image], 2.0) == 4.0
    both = reconstruction_loss([text + 1, torch.zeros(2, 15, 6)], [text, torch.zeros(2, 15, 6)], 2.0)
    assert both == 60 / 240  # 60 erring elements of 240
    with pytest.raises(ValueError):
        reconstruction_loss([text], [text, text], 2.0)


def test_flux_reconstruction_moves_the_image_stream_codes_too():
    """Image-stream layers of Flux's double blocks got no gradient and stayed at nearest rounding."""
    base = dict(weights="int4", activations=None, calib_prompts=1, calib_num_steps=2, calib_steps="all",
                calib_kwargs=(("height", 16), ("width", 16)))
    nearest, reconstructed = build_tiny("flux"), build_tiny("flux")
    quantize_(nearest, PTQConfig(**base))
    quantize_(reconstructed, PTQConfig(**base, reconstruct=True, recon_iters=200, recon_samples=4, recon_batch=2,
                                       recon_lr=1e-2))
    for name in ("transformer_blocks.0.attn.to_q", "transformer_blocks.0.ff.net.2",
                 "transformer_blocks.0.ff_context.net.2"):
        codes = [pipe.transformer.get_submodule(name).weight_codes for pipe in (nearest, reconstructed)]
        assert not torch.equal(*codes), name


def test_pipeline_reconstruction_runs_and_generates():
    pipe = build_tiny("flux")
    config = PTQConfig(weights="int4", calib_prompts=1, calib_num_steps=2, calib_steps="all",
                       calib_kwargs=(("height", 16), ("width", 16)),
                       reconstruct=True, recon_iters=5, recon_act_iters=3, recon_samples=4, recon_batch=2)
    quantize_(pipe, config)
    images = pipe(**tiny_call_kwargs("flux")).images
    assert torch.isfinite(images).all()


def test_adaround_keeps_pruned_zeros_at_zero_however_it_learns():
    from diffusion_accel.quant.reconstruct import AdaRound

    weight = torch.tensor([[0.0, 0.3, 0.0, -0.7], [0.26, 0.0, 0.0, 0.9]])
    rounding = AdaRound(weight, torch.full((2, 1), 0.1), [4], "int8")
    with torch.no_grad():
        rounding.alpha.fill_(10.0)  # every weight rounded up
    assert torch.equal(rounding()[weight == 0], torch.zeros(4))
    assert torch.equal(rounding.hard_codes()[weight == 0], torch.zeros(4, dtype=torch.int8))
    assert torch.equal(rounding.hard_codes()[weight != 0], torch.tensor([4, -6, 3, 10], dtype=torch.int8))


def test_reconstruction_with_timestep_groups_runs_each_batch_in_its_samples_group(monkeypatch):
    """Blocks are reconstructed outside any denoiser call, where every sample took group 0's activation scales
    and only group 0's were learned; now each batch holds one group's samples, quantized with its scales."""
    from diffusion_accel.quant import layers as layers_module
    from diffusion_accel.quant import reconstruct as reconstruct_module

    used, changed = [], {}
    group_qparams = layers_module.ActQuantizer.group_qparams

    def spying(self):
        if torch.is_grad_enabled() and self.selector is not None:
            used.append(self.selector.index_for_call())
        return group_qparams(self)

    block_pass = reconstruct_module.reconstruct_block

    def recording(block, layers, originals, batches, count, config, **groups):
        before = {name: layer.act.scale.detach().clone() for name, layer in layers.items()}
        block_pass(block, layers, originals, batches, count, config, **groups)
        for name, layer in layers.items():
            changed[name] = (layer.act.scale - before[name]).abs().amax(dim=1) > 0

    monkeypatch.setattr(layers_module.ActQuantizer, "group_qparams", spying)
    monkeypatch.setattr(reconstruct_module, "reconstruct_block", recording)
    quantize_(build_tiny("sd"), PTQConfig(timestep_groups=2, calib_prompts=1, calib_num_steps=4, calib_steps="all",
                                          reconstruct=True, recon_iters=12, recon_act_iters=12, recon_samples=8,
                                          recon_batch=4, lower=False))
    assert set(used) == {0, 1}
    assert any(bool(flags[1]) for flags in changed.values())  # group 1's scales learned too


def test_an_interrupted_reconstruction_leaves_every_parameter_trainable_as_before(monkeypatch):
    """The clean-up froze the final codes before it gave the block's parameters back their requires_grad: an
    interrupt there (a second Ctrl-C) left the rolled-back denoiser's norms and biases frozen."""
    import diffusion_accel.quant.reconstruct as reconstruct

    def interrupted(layers):
        raise KeyboardInterrupt

    monkeypatch.setattr(reconstruct, "_freeze", interrupted)
    _assert_interrupted_quantize_leaves_requires_grad()


def test_an_interrupt_while_adaround_is_attached_leaves_every_parameter_trainable_as_before(monkeypatch):
    """The parameters were frozen before the try whose finally restores them: a Ctrl-C while a block's AdaRound
    modules were built left its norms and biases frozen (until session 49)."""
    import diffusion_accel.quant.reconstruct as reconstruct

    built = []
    adaround_init = reconstruct.AdaRound.__init__

    def init(self, *args, **kwargs):
        built.append(1)
        if len(built) == 20:  # a later block's
            raise KeyboardInterrupt
        adaround_init(self, *args, **kwargs)

    monkeypatch.setattr(reconstruct.AdaRound, "__init__", init)
    _assert_interrupted_quantize_leaves_requires_grad()
    assert len(built) == 20


def _assert_interrupted_quantize_leaves_requires_grad() -> None:
    pipe = build_tiny("sd")
    before = {name: p.requires_grad for name, p in pipe.unet.named_parameters()}
    with pytest.raises(KeyboardInterrupt):
        quantize_(pipe, PTQConfig(reconstruct=True, recon_iters=2, recon_samples=2, recon_batch=2, calib_prompts=1,
                                  calib_num_steps=2, calib_steps="all"))
    assert {name: p.requires_grad for name, p in pipe.unet.named_parameters()} == before


@pytest.mark.parametrize("options", [{"activations": None}, {"act_mode": "dynamic"}])
def test_activation_step_iterations_without_static_activation_scales_are_refused(options):
    """They were accepted, ran a forward and backward pass each and learned nothing, while the note said they had."""
    pipe = build_tiny("sd")
    config = PTQConfig(weights="int4", reconstruct=True, recon_iters=2, recon_act_iters=5, calib_prompts=1,
                       calib_num_steps=2, calib_steps="all", **options)
    with pytest.raises(ValueError, match="recon_act_iters=5 learns static activation scales"):
        quantize_(pipe, config)
    assert not any(isinstance(module, QuantLinear) for module in pipe.unet.modules())


def test_a_block_without_activation_scales_runs_only_its_rounding_iterations():
    """A block whose activations all stay in floating point (act_exclude) ran max(recon_iters, recon_act_iters)
    passes, the ones past recon_iters updating nothing."""
    config = PTQConfig(weights="int4", activations=None, recon_iters=4, recon_batch=8)
    config_with_act_iters = PTQConfig(weights="int4", recon_iters=4, recon_act_iters=20, recon_batch=8)
    block, x = _tiny_block(), torch.randn(16, 32)
    target = _tiny_block()(x).detach()
    originals = _quantize_block(block, config)
    calls = []

    def batches(idx):
        calls.append(idx)
        return (x[idx],), {}, target[idx]

    layers = {name: block[int(name)] for name in originals}  # weight-only layers: no activation quantizer
    reconstruct_block(block, layers, originals, batches, 16, config_with_act_iters)
    assert len(calls) == 4


def test_quantized_layers_outside_every_block_are_reconstructed_too():
    """With keep_high_precision=False conv_in, the time embedding and conv_out are quantized but lie outside the
    adapter's blocks: they kept nearest rounding while the note said every block was reconstructed."""
    from diffusion_accel.quant.state import get_state

    base = dict(weights="int4", activations=None, calib_prompts=1, calib_num_steps=2, calib_steps="all",
                lower=False, keep_high_precision=False)
    nearest, learned = build_tiny("sd"), build_tiny("sd")
    quantize_(nearest, PTQConfig(**base))
    quantize_(learned, PTQConfig(**base, reconstruct=True, recon_iters=150, recon_samples=4, recon_batch=2,
                                 recon_lr=1e-2))
    outside = ["conv_in", "time_embedding.linear_1", "time_embedding.linear_2", "conv_out"]
    assert set(outside) <= set(get_state(learned.unet).layers)
    for name in outside:
        assert not torch.equal(nearest.unet.get_submodule(name).weight_codes,
                               learned.unet.get_submodule(name).weight_codes), name


def test_blocks_the_memory_budget_leaves_few_samples_are_named_in_a_warning_and_the_notes():
    from diffusion_accel.quant.state import get_state

    pipe = build_tiny("sd")
    config = PTQConfig(weights="int4", activations=None, calib_prompts=2, calib_num_steps=2, calib_steps="all",
                       reconstruct=True, recon_iters=1, recon_samples=8, recon_max_bytes=300_000)
    with pytest.warns(RuntimeWarning, match="recon_max_bytes=300000 held .* samples in .* blocks"):
        quantize_(pipe, config)
    assert any("raise recon_max_bytes" in note for note in get_state(pipe.unet).notes)


def test_a_memory_budget_below_one_sample_per_block_names_recon_max_bytes():
    """The error said "raise max_bytes", an option PTQConfig has not (session 53 review)."""
    from diffusion_accel.artifact import applied_techniques

    pipe = build_tiny("sd")
    config = PTQConfig(weights="int4", activations=None, calib_prompts=1, calib_num_steps=2, calib_steps="all",
                       reconstruct=True, recon_iters=1, recon_samples=8, recon_max_bytes=50_000)
    with pytest.raises(ValueError, match=r"PTQConfig.recon_max_bytes=50000 cannot hold one sample .* raise "
                                         r"PTQConfig.recon_max_bytes"):
        quantize_(pipe, config)
    assert applied_techniques(pipe) == []


def test_reconstruction_batches_hold_samples_of_one_layout_and_one_timestep_group():
    """Samples whose shared tables differ (Flux Kontext, per reference-image shape) cannot merge into one call."""
    from diffusion_accel.quant.reconstruct import _batch_indices

    class Selector:
        forced = None

    layouts, groups = torch.tensor([0, 1, 0, 1, 0, 1, 0, 1]), torch.tensor([0, 0, 1, 1, 0, 0, 1, 1])
    generator = torch.Generator().manual_seed(0)
    for _ in range(20):
        selector = Selector()
        indices = _batch_indices(8, 4, generator, groups, selector, layouts)
        assert len(set(layouts[indices].tolist())) == 1 and set(groups[indices].tolist()) == {selector.forced}
        assert len(indices) == 2
    assert len(set(layouts[_batch_indices(8, 8, generator, None, None, layouts)].tolist())) == 1
