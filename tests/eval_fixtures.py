"""Inputs for the evaluation tests: a randomly initialised Inception-v3 saved in torch-fidelity's format."""
from __future__ import annotations

import torch


def random_inception_file(path) -> str:
    """A randomly initialised Inception-v3 in torch-fidelity's format (its state dict saved with torch.save).

    Kaiming-normal convolutions keep the activations of the 94 random layers O(1) instead of vanishing."""
    from unittest import mock
    from torch_fidelity import feature_extractor_inceptionv3 as fe
    torch.manual_seed(0)
    with mock.patch.object(fe, "load_state_dict_from_url", lambda *a, **k: None), \
            mock.patch.object(fe.FeatureExtractorInceptionV3, "load_state_dict", lambda self, *a, **k: None):
        net = fe.FeatureExtractorInceptionV3("inception-v3-compat", ["2048"])
    for m in net.modules():
        if isinstance(m, torch.nn.Conv2d):
            torch.nn.init.kaiming_normal_(m.weight, nonlinearity="relu")
    torch.save(net.state_dict(), str(path))
    return str(path)
