"""Self-checks of the PyTorch reference models (torch is not in the JAX suite, so these live here).

  .venv-torch/bin/python -m benchmarks.torch_reference.check

Each check raises AssertionError on failure; the last line reads "N passed, N failed" and the
exit status is non-zero if any failed. Shapes are kept small; the whole run takes seconds.
"""

from __future__ import annotations

import os
import sys
import traceback

import torch
from torch import nn

if not __package__:
    # Run as a plain script (python benchmarks/torch_reference/x.py): make the repository root
    # importable so the package import below resolves the same way as with `python -m`.
    _here = os.path.dirname(os.path.abspath(__file__))
    sys.path.insert(0, os.path.dirname(os.path.dirname(_here)))

from benchmarks.torch_reference import models


def check_parameter_counts() -> None:
    counts = models.check_parameter_counts()
    assert counts == {"usleep": 3_114_391, "cmt": 2_958_853}, counts


def check_usleep_channels() -> None:
    assert tuple(models.usleep_channels(5, 1.67, 12)) == models.USLEEP_CHANNELS
    # U-Sleep's paper setting (complexity 2) would differ: guards against a silently ignored factor.
    assert tuple(models.usleep_channels(5, 2.0, 12)) != models.USLEEP_CHANNELS


def check_usleep_shapes_and_sequences() -> None:
    torch.manual_seed(0)
    model = models.build("usleep").eval()
    with torch.no_grad():
        logits, features = model(torch.randn(2, 3, 6000))
        assert logits.shape == (2, 5) and features.shape == (2, 6, 6000)
        # L = 3 epochs in one input gives one prediction per epoch.
        logits, features = model(torch.randn(2, 3, 3 * 6000))
        assert logits.shape == (2, 5, 3) and features.shape == (2, 6, 18000)


def check_usleep_odd_lengths_round_trip() -> None:
    # 6000 samples meet odd lengths (375, 47, 3) on the way down; the decoder must crop each
    # upsampled map back to its skip so the output length equals the input length.
    model = models.USleep(in_channels=1, sampling_rate=100.0, depth=4, epoch_seconds=0.75)
    _, features = model.eval()(torch.randn(1, 1, 75))
    assert features.shape[-1] == 75, features.shape
    try:
        models.USleep(sampling_rate=200.0, kernel_seconds=8 / 200)
    except ValueError:
        pass
    else:
        raise AssertionError("an even kernel must be refused")


def check_cmt_shapes() -> None:
    torch.manual_seed(0)
    model = models.build("cmt").eval()
    with torch.no_grad():
        logits, features = model(torch.randn(2, 3, 6000))
    assert logits.shape == (2, 5) and features.shape == (2, 768)


def check_cmt_third_branch_input() -> None:
    torch.manual_seed(0)
    x = torch.randn(2, 3, 6000)
    changed = x.clone()
    changed[:, 2] = torch.randn(2, 6000)
    with torch.no_grad():
        as_original = models.CrossModalTransformer().eval()
        # The original's third branch re-reads channel 0, so channel 2 has no effect at all.
        assert torch.equal(as_original(x)[0], as_original(changed)[0])
        own_channel = models.CrossModalTransformer(third_branch_reads_first_channel=False).eval()
        assert not torch.allclose(own_channel(x)[0], own_channel(changed)[0])


def check_every_parameter_gets_a_gradient() -> None:
    torch.manual_seed(0)
    for name in ("usleep", "cmt"):
        model = models.build(name).train()
        logits, _ = model(torch.randn(2, 3, 6000))
        nn.functional.cross_entropy(logits, torch.tensor([0, 3])).backward()
        missing = [n for n, p in model.named_parameters()
                   if p.grad is None or not torch.any(p.grad != 0)]
        assert not missing, f"{name}: no gradient reaches {missing}"


def check_a_few_steps_fit_a_tiny_batch() -> None:
    # The timed step must actually train: Adam on one fixed batch drives the loss down. U-Sleep
    # moves slowly (its head averages tanh over 6000 samples; measured 1.61 -> 1.43 in 12 steps),
    # the transformer fast (1.82 -> ~0.004), hence the two bounds.
    torch.manual_seed(0)
    for name, bound in (("usleep", 0.93), ("cmt", 0.5)):
        model = models.build(name).train()
        optimizer = torch.optim.Adam(model.parameters(), lr=1e-3, betas=(0.9, 0.999), eps=1e-9,
                                     weight_decay=1e-4)
        x = torch.randn(4, 3, 6000)
        labels = torch.tensor([0, 1, 2, 4])
        losses = []
        for _ in range(12):
            optimizer.zero_grad()
            loss = nn.functional.cross_entropy(model(x)[0], labels)
            loss.backward()
            optimizer.step()
            losses.append(loss.item())
        assert losses[-1] < bound * losses[0], f"{name}: loss {losses[0]:.3f} -> {losses[-1]:.3f}"


CHECKS = [value for key, value in sorted(globals().items()) if key.startswith("check_")]


def main() -> int:
    failed = 0
    for check in CHECKS:
        try:
            check()
        except Exception:  # report every failing check, not just the first
            failed += 1
            print(f"FAIL {check.__name__}", file=sys.stderr)
            traceback.print_exc()
        else:
            print(f"ok   {check.__name__}")
    print(f"{len(CHECKS) - failed} passed, {failed} failed")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
