"""The drop-in contract holds for every tiny family, untransformed and after calibration."""

import pytest

from diffusion_accel.testing.contract import check_drop_in
from diffusion_accel.testing.tiny import TINY_BUILDERS, build_tiny

FAMILIES = sorted(TINY_BUILDERS)


@pytest.mark.parametrize("family", FAMILIES)
def test_untransformed_pipelines_meet_the_contract(family):
    check_drop_in(family, lambda pipe: pipe)


def test_contract_catches_a_replaced_pipeline():
    with pytest.raises(AssertionError, match="same object|object it was given"):
        check_drop_in("sd", lambda pipe: build_tiny("sd"))


def test_contract_catches_a_patched_call():
    def patch(pipe):
        pipe.__call__ = lambda *a, **k: None
        return pipe

    with pytest.raises(AssertionError, match="patched"):
        check_drop_in("sd", patch)


def test_contract_catches_classifier_free_guidance_made_a_no_op():
    """Copying the conditional half of the CFG batch over the unconditional half passed a shape-only check."""
    def break_guidance(pipe):
        def conditional_everywhere(module, args, output):
            sample = output[0]
            half = sample.shape[0] // 2
            sample[:half] = sample[half:].clone()
            return output

        pipe.unet.register_forward_hook(conditional_everywhere)
        return pipe

    with pytest.raises(AssertionError, match="CFG is a no-op"):
        check_drop_in("sd", break_guidance)
